//! What the user sees: JSON lines for scripts, or a banner, messages and progress bars for
//! people, and the receiver's accept prompt.
//!
//! - `--json`: one JSON object per line on stdout ([`Event`]), nothing else on stdout;
//!   stderr carries only logs. docs/json-events.md lists the events and their fields.
//! - Human mode: a banner and a startup saying when stdout is a terminal, messages on
//!   stderr, and indicatif bars (one per file in flight plus an overall bar with speed and
//!   ETA). When stdout is not a terminal there are no banner and no bars.
//!
//! The progress API ([`TransferProgress`]) takes plain numbers (file index, bytes done,
//! bytes total) so the engine only has to call it; it is `Send + Sync` and cheap to call
//! often (JSON progress lines are rate-limited).
//!
//! What this module does not do: decide anything about a transfer (the prompt returns the
//! user's answer; the caller acts on it) or validate names (the receiver machine does; here
//! they are only made safe to print).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, IsTerminal, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::cli::OnConflict;
use crate::code::JoinCode;
use crate::pairing::{Paired, Rendezvous, Role};

/// The path a transfer took, as reported in the summary.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// Directly on the local network (or the same machine).
    LanDirect,
    /// Directly through NATs after hole punching.
    HolePunched,
    /// Through a TURN relay.
    Relayed,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::LanDirect => "direct (LAN)",
            Self::HolePunched => "direct (hole-punched)",
            Self::Relayed => "relayed (TURN)",
        })
    }
}

impl Route {
    /// The route of an ICE route kind.
    pub fn of(kind: flux_ice::RouteKind) -> Self {
        match kind {
            flux_ice::RouteKind::Host => Self::LanDirect,
            flux_ice::RouteKind::Srflx => Self::HolePunched,
            flux_ice::RouteKind::Relay => Self::Relayed,
        }
    }
}

/// The candidate pair a transfer runs on, as ICE selected it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoutePath {
    /// `host`, `srflx` (direct through NATs) or `relay`.
    pub kind: &'static str,
    /// Our candidate's type: `host`, `srflx`, `prflx` or `relay`.
    pub local: &'static str,
    /// The peer's candidate's type.
    pub remote: &'static str,
    /// `udp`, or `tcp`/`tls` when we reach our TURN server over a stream.
    pub transport: &'static str,
    /// `v4` or `v6`.
    pub family: &'static str,
    /// Our address on the pair (our relayed address when we relay).
    pub local_addr: String,
    /// The peer's address on the pair.
    pub remote_addr: String,
    /// From the start of ICE (pairing done) to the first selected pair.
    pub connect_ms: f64,
}

impl RoutePath {
    /// The path of a selected pair.
    pub fn new(s: &flux_ice::Selected, connect: Duration) -> Self {
        Self {
            kind: s.kind.as_str(),
            local: s.local_kind.as_str(),
            remote: s.remote_kind.as_str(),
            transport: s.transport.as_str(),
            family: if s.remote.is_ipv4() { "v4" } else { "v6" },
            local_addr: s.local.to_string(),
            remote_addr: s.remote.to_string(),
            connect_ms: connect.as_secs_f64() * 1e3,
        }
    }
}

impl std::fmt::Display for RoutePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} → {} over {} ({}), {} → {}, ICE {:.0} ms",
            self.local,
            self.remote,
            self.transport,
            self.family,
            self.local_addr,
            self.remote_addr,
            self.connect_ms
        )
    }
}

/// One offered file, as the receiver's prompt shows it.
#[derive(Clone, Debug, Eq, PartialEq, Serialize)]
pub struct OfferedFile {
    /// Relative path as the sender named it (untrusted: printed escaped).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits as sent (before the receiver's mode rules).
    pub mode: u32,
}

/// One offered symbolic link, as the receiver's prompt shows it.
#[derive(Clone, Debug, Eq, PartialEq, Serialize)]
pub struct OfferedLink {
    /// Relative path of the link (untrusted: printed escaped).
    pub name: String,
    /// Where it points, as sent (untrusted: printed escaped).
    pub target: String,
}

/// What the sender offers, and what accepting it would do here.
#[derive(Clone, Debug, Default, Eq, PartialEq, Serialize)]
pub struct Offer {
    /// Files (directories are implied by paths).
    pub files: Vec<OfferedFile>,
    /// Symbolic links, every one listed with its target.
    pub links: Vec<OfferedLink>,
    /// Directory entries in the share.
    pub dirs: usize,
    /// Where it would land (`--out`).
    pub destination: String,
    /// Files that exist here with another size or kind: what happens to them is
    /// `--on-conflict`'s (asked in the prompt by default).
    pub replaces: Vec<String>,
    /// Files already here with the same size: skipped when identical.
    pub same_size_here: usize,
    /// Every entry (files, directories, links), for `--json`.
    pub entries: Vec<OfferEntry>,
    /// Offered files not chosen (`--include`, `--exclude`, `--select`): not received.
    pub left_out: usize,
    /// The one file is a stream (`thru host -`): its size is learned at its end, and it
    /// cannot be resumed.
    pub stream: bool,
}

impl Offer {
    /// Sum of the file sizes.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Final numbers of one transfer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// The peer (`host`, `joiner 1`…).
    pub peer: String,
    /// `sending` or `receiving`.
    pub side: Side,
    /// Files now in place at the receiver (up-to-date ones included).
    pub files: u64,
    /// Files the receiver already held identical: nothing of them was sent.
    pub up_to_date: u64,
    /// Payload bytes of the whole share.
    pub bytes: u64,
    /// Payload bytes that crossed the network in this run.
    pub sent_bytes: u64,
    /// What those bytes took on the wire: below `sent_bytes` when chunks were compressed
    /// (`--compress`).
    pub wire_bytes: u64,
    /// Payload bytes the receiver already held in partly received files (resumed);
    /// up-to-date files are not counted here.
    pub resumed_bytes: u64,
    /// Seconds from acceptance to the end.
    pub seconds: f64,
    /// The path taken.
    pub route: Route,
    /// The ICE pair, when ICE chose the path (through a signaling server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<RoutePath>,
    /// Receiver with `--durable`: seconds spent syncing to stable storage (inside `seconds`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synced_seconds: Option<f64>,
    /// Offered files the receiver did not choose (`--include`, `--exclude`, `--select`).
    pub left_out: u64,
}

/// The version of the `--json` event format, in the first event (`start`). It changes when a
/// field is removed or changes meaning; new events and fields may come without a change.
pub const JSON_SCHEMA: u32 = 2;

/// One offered entry in the `offer` event.
#[derive(Clone, Debug, Eq, PartialEq, Serialize)]
pub struct OfferEntry {
    /// Relative path as the sender named it.
    pub path: String,
    /// Size in bytes (0 for directories and links).
    pub size: u64,
    /// `file`, `dir` or `symlink`.
    pub kind: &'static str,
}

/// One `--json` line. Field names are stable; new fields may be added.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// Always the first event: the format version and this side's role.
    Start {
        /// [`JSON_SCHEMA`].
        schema: u32,
        /// `thru`'s version.
        version: &'static str,
        /// `host` or `joiner`.
        role: Role,
    },
    /// Host: what is offered, before the code.
    Offering {
        /// Number of files.
        files: u64,
        /// Total bytes.
        bytes: u64,
        /// `thru host --text`: the text's length in bytes (then `files` and `bytes` are 0).
        #[serde(skip_serializing_if = "Option::is_none")]
        text_bytes: Option<u64>,
    },
    /// The join code to give the receiver.
    Code {
        /// The full code, in the form the host prints (`--words` or not).
        code: String,
        /// The same code in the word form.
        words: String,
        /// `server` or `lan`.
        mode: &'static str,
        /// LAN: the `--peer` address joiners can use when mDNS does not reach.
        #[serde(skip_serializing_if = "Option::is_none")]
        peer_hint: Option<String>,
    },
    /// `--web`: the relay link to give out (host: a download link; joiner: an upload link).
    WebLink {
        /// The link; in end-to-end mode its `#fragment` is the key.
        url: String,
        /// `--plain`: curl commands that use the link.
        curl: Vec<String>,
        /// `e2e` or `plain`.
        mode: &'static str,
    },
    /// Something the user should know that is not an error (`--web --plain`).
    Warning {
        /// What.
        message: String,
    },
    /// A peer paired (authenticated).
    Peer {
        /// This side's role.
        role: Role,
        /// `host` or `joiner N`.
        peer: String,
        /// How it was found.
        rendezvous: Rendezvous,
        /// The peer's pinned certificate fingerprint (hex).
        fingerprint: String,
        /// This side's fingerprint (hex).
        local_fingerprint: String,
        /// The peer's authenticated addresses.
        addrs: Vec<String>,
    },
    /// ICE selected the pair the transfer with `peer` runs on (again when it changes).
    Route {
        /// The peer.
        peer: String,
        /// `lan_direct`, `hole_punched` or `relayed`.
        route: Route,
        /// The pair.
        #[serde(flatten)]
        path: RoutePath,
    },
    /// A pairing attempt failed.
    PairingFailed {
        /// Who.
        peer: String,
        /// Why.
        error: String,
    },
    /// Receiver: the sender's offer.
    Offer {
        /// Every entry, in manifest order.
        entries: Vec<OfferEntry>,
        /// Number of files.
        files: usize,
        /// Total bytes.
        bytes: u64,
        /// Number of directories.
        dirs: usize,
        /// Every link with its target (escaped when shown to a person, raw here as JSON).
        links: Vec<OfferedLink>,
        /// Files that exist here with other content (`--on-conflict`).
        replaces: Vec<String>,
        /// Files already here with the same size.
        same_size_here: usize,
        /// The destination directory.
        destination: String,
        /// Offered files not chosen (`--include`, `--exclude`, `--select`).
        left_out: usize,
    },
    /// Joiner with `--list`: the whole offer; nothing is received.
    Listing {
        /// Every entry, in manifest order.
        entries: Vec<OfferEntry>,
        /// Number of files.
        files: usize,
        /// Total bytes.
        bytes: u64,
        /// Number of directories.
        dirs: usize,
        /// Every link with its target.
        links: Vec<OfferedLink>,
    },
    /// Receiver: the text the host sent (`thru host --text`), once accepted.
    Text {
        /// The peer.
        peer: String,
        /// The text, as sent (JSON-escaped).
        text: String,
        /// Its length in bytes.
        bytes: u64,
    },
    /// The offer was accepted (receiver: by this side; host: by `peer`).
    Accepted {
        /// The peer.
        peer: String,
        /// Number of files.
        files: usize,
        /// Total bytes.
        bytes: u64,
    },
    /// Host: `peer` declined the offer.
    Declined {
        /// The peer.
        peer: String,
        /// The reason it gave.
        reason: String,
    },
    /// Host: where a receiver stands, each time that changes.
    Receiver {
        /// The receiver.
        peer: String,
        /// What it is doing now.
        state: ReceiverState,
        /// Why it left (`gone`, `declined`), when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The transfer was paused or resumed (the receiver pressed `p`); the connection stays up.
    Pause {
        /// The other side.
        peer: String,
        /// Paused now (`false`: resumed).
        paused: bool,
    },
    /// Progress, at most four a second.
    Progress {
        /// The peer.
        peer: String,
        /// Current file's name (escaped).
        file: String,
        /// Bytes done of that file.
        done: u64,
        /// That file's size.
        total: u64,
        /// Bytes done overall.
        overall_done: u64,
        /// Total bytes overall.
        overall_total: u64,
        /// Bytes that crossed the network so far (resumed ones excluded).
        sent_bytes: u64,
        /// Average network rate since acceptance; null in the first second.
        rate_bytes_per_s: Option<f64>,
        /// Seconds left at that rate; null while unknown.
        eta_s: Option<f64>,
        /// Seconds since acceptance.
        elapsed_s: f64,
        /// Wall-clock time of this line, milliseconds since the Unix epoch.
        ts_ms: u64,
    },
    /// A file is complete (receiver: verified and in place; host: all of it sent or held).
    FileDone {
        /// The peer.
        peer: String,
        /// Name (escaped).
        file: String,
        /// Size.
        bytes: u64,
        /// The receiver already held it identical: nothing was sent.
        up_to_date: bool,
    },
    /// The transfer ended.
    Summary(Summary),
    /// Host: every receiver is done; the totals over all of them.
    HostSummary {
        /// Receivers that got everything.
        receivers_done: u64,
        /// Receivers whose transfer failed or who declined.
        receivers_failed: u64,
        /// Payload bytes sent over all receivers.
        sent_bytes: u64,
        /// Seconds from the first acceptance to the end.
        seconds: f64,
    },
    /// `--benchmark` figures of one transfer.
    Benchmark {
        /// The peer.
        peer: String,
        /// `sending` or `receiving`.
        side: Side,
        /// Payload bytes that crossed the network in this run (resumed and skipped data
        /// excluded).
        bytes: u64,
        /// What those bytes took on the wire (less when compressed).
        wire_bytes: u64,
        /// Average payload rate over the transfer.
        avg_gbit_s: f64,
        /// Best one-second payload rate (never below the average: a transfer shorter than
        /// a second has no full second, and its average is its peak).
        peak_1s_gbit_s: f64,
        /// Time to the completed QUIC handshake (joiner: from the start of connecting).
        #[serde(skip_serializing_if = "Option::is_none")]
        connect_ms: Option<f64>,
        /// Time from acceptance to the first chunk (joiner: verified and written; host: sent).
        #[serde(skip_serializing_if = "Option::is_none")]
        first_byte_ms: Option<f64>,
        /// Smoothed round-trip time at the end.
        #[serde(skip_serializing_if = "Option::is_none")]
        rtt_ms: Option<f64>,
        /// Packets QUIC declared lost, as a share of those sent by this side.
        #[serde(skip_serializing_if = "Option::is_none")]
        loss_pct: Option<f64>,
        /// CPU seconds (user + system) of this process so far.
        cpu_s: f64,
        /// The QUIC stack (`quinn`, `s2n`).
        quic: &'static str,
        /// The ICE pair, when ICE chose the path.
        #[serde(skip_serializing_if = "Option::is_none")]
        path: Option<RoutePath>,
        /// Receiver: what `--disk` chose for the writes, and why.
        #[serde(skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
    },
    /// The command failed.
    Error {
        /// The message chain.
        message: String,
        /// What to try, when there is a likely cause.
        #[serde(skip_serializing_if = "Option::is_none")]
        hint: Option<String>,
        /// The process exit code.
        exit_code: u8,
    },
}

/// Where one of a host's receivers stands (the `receiver` event, and the host's screen).
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiverState {
    /// Paired; its QUIC connection is not up yet.
    Waiting,
    /// Connected; it is looking at the offer (its prompt).
    Prompt,
    /// Receiving (the progress lines carry its rate).
    Receiving,
    /// It paused the transfer.
    Paused,
    /// It got everything.
    Done,
    /// It only listed the offer (`thru join --list`) and left; its slot is free again.
    Listed,
    /// It declined the offer.
    Declined,
    /// It stopped, was killed, or its connection was lost.
    Gone,
}

impl ReceiverState {
    fn text(self) -> &'static str {
        match self {
            Self::Waiting => "paired, connecting",
            Self::Prompt => "connected, at the prompt",
            Self::Receiving => "receiving",
            Self::Paused => "paused",
            Self::Done => "done",
            Self::Listed => "looked at the offer and left (thru join --list)",
            Self::Declined => "declined",
            Self::Gone => "gone",
        }
    }
}

/// How output is rendered.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Mode {
    /// JSON lines on stdout.
    Json,
    /// For people; `fancy` when stdout is a terminal (banner, bars).
    Human {
        /// Banner and progress bars.
        fancy: bool,
    },
}

/// The output sink. Cheap to clone; share it with the engine.
#[derive(Clone, Debug)]
pub struct Ui {
    mode: Mode,
    quiet: bool,
}

impl Ui {
    /// Picks the mode from the flags and whether stdout is a terminal.
    pub fn new(json: bool, quiet: bool) -> Self {
        let mode = if json {
            Mode::Json
        } else {
            Mode::Human {
                fancy: io::stdout().is_terminal(),
            }
        };
        Self { mode, quiet }
    }

    /// A UI with an explicit mode (tests).
    pub fn with_mode(mode: Mode) -> Self {
        Self { mode, quiet: false }
    }

    /// The mode in use.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The banner and a startup saying, in fancy human mode only.
    pub fn banner(&self, version: &str) {
        if self.mode == (Mode::Human { fancy: true }) && !self.quiet {
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{}", banner_text(version));
            let _ = writeln!(out, "  {}\n", saying(seed()));
        }
    }

    /// Emits `event` in JSON mode; in human mode only the benchmark report and the host's
    /// overall summary are printed.
    pub fn emit(&self, event: &Event) {
        if self.mode == Mode::Json {
            emit_json(event);
        } else if let Some(line) = human_line(event) {
            self.say(&line);
        }
    }

    /// Shows the join code and how to use it.
    pub fn code(
        &self,
        code: &JoinCode,
        words: bool,
        server: Option<&str>,
        peer_hint: Option<String>,
    ) {
        match self.mode {
            Mode::Json => emit_json(&Event::Code {
                code: if words {
                    code.to_words()
                } else {
                    code.to_string()
                },
                words: code.to_words(),
                mode: if server.is_some() { "server" } else { "lan" },
                peer_hint,
            }),
            Mode::Human { .. } => {
                let code = if words {
                    code.to_words()
                } else {
                    code.to_string()
                };
                let mut msg = format!("Join code: {code}\n\nOn the receiving machine run:\n");
                match server {
                    Some(url) => {
                        let _ = writeln!(msg, "  thru join {code} --server {url}");
                    }
                    None => {
                        let _ = writeln!(msg, "  thru join {code}");
                        if let Some(hint) = &peer_hint {
                            let _ = writeln!(
                                msg,
                                "(if it does not find this machine: thru join {code} --peer {hint})"
                            );
                        }
                    }
                }
                // On stdout, even with --quiet: without the code nothing can happen.
                let mut out = io::stdout().lock();
                let _ = write!(out, "{msg}");
                let _ = out.flush();
            }
        }
    }

    /// `--web`: the relay link (and the curl commands in plain mode), on stdout even with
    /// `--quiet`, like the join code.
    pub fn web_link(&self, url: &str, curl: &[String]) {
        let mode = if curl.is_empty() && url.contains('#') {
            "e2e"
        } else {
            "plain"
        };
        match self.mode {
            Mode::Json => emit_json(&Event::WebLink {
                url: url.to_string(),
                curl: curl.to_vec(),
                mode,
            }),
            Mode::Human { .. } => {
                let mut msg = format!("Link: {url}\n");
                if !curl.is_empty() {
                    msg.push_str("\nWith curl:\n");
                    for c in curl {
                        let _ = writeln!(msg, "  {c}");
                    }
                }
                let mut out = io::stdout().lock();
                let _ = write!(out, "{msg}");
                let _ = out.flush();
            }
        }
    }

    /// A warning on stderr ("Warning: …"), shown even with `--quiet`; a `warning` event
    /// under `--json`.
    pub fn warn(&self, text: &str) {
        match self.mode {
            Mode::Json => emit_json(&Event::Warning {
                message: safe_text(text),
            }),
            Mode::Human { .. } => {
                let _ = writeln!(io::stderr().lock(), "Warning: {}", safe_text(text));
            }
        }
    }

    /// Host: "Offering stdin as a stream named NAME" (`thru host -`).
    pub fn offering_stream(&self, name: &str) {
        match self.mode {
            Mode::Json => emit_json(&Event::Offering {
                files: 1,
                bytes: 0,
                text_bytes: None,
            }),
            Mode::Human { .. } => self.say(&format!(
                "Offering stdin as a stream named {} (one receiver; it cannot be resumed)",
                safe_name(name)
            )),
        }
    }

    /// Host: "Offering 7 files, 48.0 MiB".
    pub fn offering(&self, files: u64, bytes: u64) {
        match self.mode {
            Mode::Json => emit_json(&Event::Offering {
                files,
                bytes,
                text_bytes: None,
            }),
            Mode::Human { .. } => self.say(&format!(
                "Offering {}, {}",
                plural(files, "file", "files"),
                HumanBytes(bytes)
            )),
        }
    }

    /// Host: "Offering a text of 12 B" (`--text`).
    pub fn offering_text(&self, bytes: u64) {
        match self.mode {
            Mode::Json => emit_json(&Event::Offering {
                files: 0,
                bytes: 0,
                text_bytes: Some(bytes),
            }),
            Mode::Human { .. } => self.say(&format!("Offering a text of {}", HumanBytes(bytes))),
        }
    }

    /// Receiver: asks whether to show the text the host offers (`yes`: without asking).
    pub fn confirm_text(&self, bytes: u64, yes: bool) -> Result<bool, PromptError> {
        let interactive = io::stdin().is_terminal() && self.mode != Mode::Json;
        let mut err = io::stderr();
        let quiet = self.mode == Mode::Json || self.quiet;
        let mut sink = io::sink();
        let out: &mut dyn Write = if quiet { &mut sink } else { &mut err };
        writeln!(out, "The sender offers a text of {}.", HumanBytes(bytes))?;
        if yes {
            writeln!(out, "Accepted (--yes).")?;
            return Ok(true);
        }
        if !interactive {
            return Err(PromptError::NotATerminal);
        }
        write!(out, "Show it? [y/N] ")?;
        out.flush()?;
        let mut line = String::new();
        io::stdin().lock().read_line(&mut line)?;
        let answer = line.trim().to_ascii_lowercase();
        Ok(answer == "y" || answer == "yes")
    }

    /// Receiver: prints the host's text on stdout. To a pipe or file it goes exactly as sent;
    /// on a terminal, control characters other than newlines and tabs are escaped (a text
    /// must not be able to drive the terminal), and a final newline is added. Under `--json`
    /// it is the `text` event.
    pub fn show_text(&self, peer: &str, text: &str) {
        if self.mode == Mode::Json {
            return emit_json(&Event::Text {
                peer: peer.to_string(),
                text: text.to_string(),
                bytes: text.len() as u64,
            });
        }
        let mut out = io::stdout().lock();
        if io::stdout().is_terminal() {
            let shown: String = text
                .split('\n')
                .map(|line| {
                    line.split('\t')
                        .map(safe_text)
                        .collect::<Vec<_>>()
                        .join("\t")
                })
                .collect::<Vec<_>>()
                .join("\n");
            let _ = writeln!(out, "{}", shown.trim_end_matches('\n'));
        } else {
            let _ = out.write_all(text.as_bytes());
        }
        let _ = out.flush();
    }

    /// Host: the text went to `peer`; the summary of a text transfer.
    pub fn text_sent(&self, peer: &str, bytes: u64, seconds: f64, route: Route) -> Summary {
        let summary = Summary {
            peer: peer.to_string(),
            side: Side::Sending,
            files: 0,
            up_to_date: 0,
            bytes,
            sent_bytes: bytes,
            wire_bytes: bytes,
            resumed_bytes: 0,
            seconds,
            route,
            path: None,
            synced_seconds: None,
            left_out: 0,
        };
        match self.mode {
            Mode::Json => emit_json(&Event::Summary(summary.clone())),
            Mode::Human { .. } => self.say(&format!("Sent the text to {peer}")),
        }
        summary
    }

    /// Host: the waiting line, "waiting for receivers (1 of 4 done) — Ctrl-C to stop".
    pub fn waiting(&self, done: u64, max: u64) {
        if max <= 1 {
            self.say("Waiting for the receiver — Ctrl-C to stop");
        } else {
            self.say(&format!(
                "Waiting for receivers ({done} of {max} done) — Ctrl-C to stop"
            ));
        }
    }

    /// Host: `peer` declined; said in human mode only when `say` (with one receiver the
    /// final error says it).
    pub fn declined(&self, peer: &str, reason: &str, say: bool) {
        match self.mode {
            Mode::Json => emit_json(&Event::Declined {
                peer: peer.to_string(),
                reason: safe_text(reason),
            }),
            Mode::Human { .. } if say => self.say(&format!("{peer} declined: {reason}")),
            Mode::Human { .. } => {}
        }
    }

    /// Host: receiver `peer` is now in `state` (`reason`: why it left). A line on the
    /// host's screen, the `receiver` event under `--json`.
    pub fn receiver(&self, peer: &str, state: ReceiverState, reason: Option<&str>) {
        match self.mode {
            Mode::Json => emit_json(&Event::Receiver {
                peer: peer.to_string(),
                state,
                reason: reason.map(safe_text),
            }),
            Mode::Human { .. } => match reason {
                Some(r) => self.say(&format!("{peer}: {} ({r})", state.text())),
                None => self.say(&format!("{peer}: {}", state.text())),
            },
        }
    }

    /// The transfer with `peer` was paused or resumed.
    pub fn pause(&self, peer: &str, paused: bool, local: bool) {
        match self.mode {
            Mode::Json => emit_json(&Event::Pause {
                peer: peer.to_string(),
                paused,
            }),
            // The host's screen shows it as the receiver's state.
            Mode::Human { .. } if !local => {}
            Mode::Human { .. } => self.say(pause_text(paused)),
        }
    }

    /// Emits the first JSON event (`start`, with the schema version).
    pub fn start(&self, role: Role) {
        if self.mode == Mode::Json {
            emit_json(&Event::Start {
                schema: JSON_SCHEMA,
                version: env!("CARGO_PKG_VERSION"),
                role,
            });
        }
    }

    /// Reports a paired peer.
    pub fn peer(&self, p: &Paired) {
        match self.mode {
            Mode::Json => emit_json(&Event::Peer {
                role: p.role,
                peer: p.peer_label.clone(),
                rendezvous: p.rendezvous,
                fingerprint: p.peer_fingerprint_hex(),
                local_fingerprint: p.local_fingerprint_hex(),
                addrs: p.peer_addrs.iter().map(ToString::to_string).collect(),
            }),
            Mode::Human { .. } => {
                let fp = p.peer_fingerprint_hex();
                self.say(&format!(
                    "Paired with {} (verified; key {}…)",
                    p.peer_label,
                    fp.get(..16).unwrap_or(&fp)
                ));
            }
        }
    }

    /// Reports the pair ICE selected towards `peer`.
    pub fn route(&self, peer: &str, path: &RoutePath, route: Route) {
        match self.mode {
            Mode::Json => emit_json(&Event::Route {
                peer: peer.to_string(),
                route,
                path: path.clone(),
            }),
            Mode::Human { .. } => self.say(&format!("Route to {peer}: {route}, {path}")),
        }
    }

    /// Reports a failed pairing attempt.
    pub fn pairing_failed(&self, peer: &str, error: &str) {
        match self.mode {
            Mode::Json => emit_json(&Event::PairingFailed {
                peer: peer.to_string(),
                error: safe_text(error),
            }),
            Mode::Human { .. } => self.say(&format!("Pairing with {peer} failed: {error}")),
        }
    }

    /// Reports the command's final error.
    pub fn error(&self, message: &str, hint: Option<&str>, exit_code: u8) {
        match self.mode {
            Mode::Json => emit_json(&Event::Error {
                message: safe_text(message),
                hint: hint.map(safe_text),
                exit_code,
            }),
            Mode::Human { .. } => {
                // Not locked across the read: a Ctrl-C handler must still be able to write.
                let mut err = io::stderr();
                let _ = writeln!(err, "thru: error: {}", safe_text(message));
                if let Some(h) = hint {
                    let _ = writeln!(err, "  hint: {}", safe_text(h));
                }
            }
        }
    }

    /// `thru join --list`: the whole offer, as the `listing` event or as `tree` on stdout (it is
    /// what the user asked for, so `--quiet` does not hide it).
    pub fn listing(&self, manifest: &flux_transfer::Manifest, tree: &str) {
        use flux_wire::EntryKind;
        match self.mode {
            Mode::Json => {
                let entries = manifest.entries();
                self.emit(&Event::Listing {
                    entries: entries
                        .iter()
                        .map(|e| OfferEntry {
                            path: e.path.clone(),
                            size: e.size,
                            kind: match e.kind {
                                EntryKind::File => "file",
                                EntryKind::Dir => "dir",
                                EntryKind::Symlink => "symlink",
                                EntryKind::Stream => "stream",
                            },
                        })
                        .collect(),
                    files: manifest.file_count(),
                    bytes: manifest.total_bytes(),
                    dirs: entries.iter().filter(|e| e.kind == EntryKind::Dir).count(),
                    links: entries
                        .iter()
                        .filter(|e| e.kind == EntryKind::Symlink)
                        .map(|e| OfferedLink {
                            name: e.path.clone(),
                            target: e.link_target.clone(),
                        })
                        .collect(),
                });
            }
            Mode::Human { .. } => {
                let mut out = io::stdout().lock();
                let _ = out.write_all(tree.as_bytes());
                let _ = out.flush();
            }
        }
    }

    /// A line for people on stderr (silent in JSON and quiet modes). Escaped with
    /// [`safe_text`]: these lines carry errors, and errors carry peer and server text.
    pub fn say(&self, text: &str) {
        if matches!(self.mode, Mode::Human { .. }) && !self.quiet {
            let _ = writeln!(io::stderr().lock(), "{}", safe_text(text));
        }
    }

    /// Receiver: shows the offer and asks; returns `None` when declined, else what to do
    /// with each file of `offer.replaces`. `yes` accepts without asking. Reads the answers
    /// from stdin when it is a terminal; otherwise refuses with
    /// [`PromptError::NotATerminal`]. Under `--json` nothing is shown or asked on stderr.
    /// `list_all` shows every file instead of the first [`LIST_LIMIT`].
    pub fn confirm_offer(
        &self,
        offer: &Offer,
        yes: bool,
        list_all: bool,
        policy: OnConflict,
    ) -> Result<Option<Vec<Resolve>>, PromptError> {
        self.emit(&Event::Offer {
            entries: offer.entries.clone(),
            files: offer.files.len(),
            bytes: offer.total_bytes(),
            dirs: offer.dirs,
            links: offer.links.clone(),
            replaces: offer.replaces.clone(),
            same_size_here: offer.same_size_here,
            destination: offer.destination.clone(),
            left_out: offer.left_out,
        });
        let interactive = io::stdin().is_terminal() && self.mode != Mode::Json;
        let stdin = io::stdin();
        let mut input = stdin.lock();
        let limit = if list_all { usize::MAX } else { LIST_LIMIT };
        let answer = if self.mode == Mode::Json || self.quiet && yes {
            confirm(
                offer,
                yes,
                interactive,
                limit,
                policy,
                &mut input,
                &mut io::sink(),
            )?
        } else {
            // Not locked across the read: a Ctrl-C handler must still be able to write.
            let mut err = io::stderr();
            confirm(offer, yes, interactive, limit, policy, &mut input, &mut err)?
        };
        if answer.is_some() {
            self.emit(&Event::Accepted {
                peer: "host".into(),
                files: offer.files.len(),
                bytes: offer.total_bytes(),
            });
        }
        Ok(answer)
    }

    /// Starts progress reporting for one transfer, from its acceptance: rates and times
    /// count from here, not from the prompt.
    pub fn transfer(
        &self,
        peer: &str,
        side: Side,
        total_files: u64,
        total_bytes: u64,
    ) -> TransferProgress {
        let fancy = self.mode == (Mode::Human { fancy: true }) && !self.quiet;
        let multi = if fancy {
            MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        };
        let overall = multi.add(ProgressBar::new(total_bytes));
        overall.set_style(overall_style(false));
        // The host's bars, one per receiver, are its live list of receivers.
        overall.set_prefix(match side {
            Side::Sending => format!("to {peer}"),
            Side::Receiving => plural(total_files, "file", "files"),
        });
        TransferProgress {
            inner: Arc::new(Mutex::new(ProgressInner {
                ui: self.clone(),
                peer: peer.to_string(),
                side,
                multi,
                overall,
                full_style: false,
                files: HashMap::new(),
                overall_done: 0,
                overall_total: total_bytes,
                sent: 0,
                wire: 0,
                held: 0,
                up_to_date: 0,
                files_done: 0,
                started: Instant::now(),
                last_json: None,
                left_out: 0,
            })),
        }
    }
}

/// The human form of the events that have one in human mode.
fn human_line(event: &Event) -> Option<String> {
    if let Event::HostSummary {
        receivers_done,
        receivers_failed,
        sent_bytes,
        seconds,
    } = event
    {
        let mut line = format!(
            "All done: {} served",
            plural(*receivers_done, "receiver", "receivers")
        );
        if *receivers_failed > 0 {
            let _ = write!(line, ", {receivers_failed} failed or declined");
        }
        let _ = write!(line, "; {} sent in {seconds:.1} s", HumanBytes(*sent_bytes));
        return Some(line);
    }
    if let Event::Benchmark {
        peer,
        side,
        bytes,
        wire_bytes,
        avg_gbit_s,
        peak_1s_gbit_s,
        connect_ms,
        first_byte_ms,
        rtt_ms,
        loss_pct,
        cpu_s,
        quic,
        path,
        disk,
    } = event
    {
        let ms = |v: &Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1} ms"));
        let route = path
            .as_ref()
            .map_or_else(|| "LAN dial".to_string(), |p| format!("{} ({p})", p.kind));
        // Bytes and bytes per second only: one unit family per line (JSON has Gbit/s).
        let per_sec = |gbit: f64| HumanBytes((gbit * 1e9 / 8.0) as u64);
        return Some(
            format!(
                "Benchmark ({}): {} moved ({} on the wire), avg {}/s, peak 1 s {}/s, connect {}, first byte {}, RTT {}, loss {}, CPU {cpu_s:.2} s, QUIC {quic}, route {route}",
                side.towards(peer),
                HumanBytes(*bytes),
                HumanBytes(*wire_bytes),
                per_sec(*avg_gbit_s),
                per_sec(*peak_1s_gbit_s),
                ms(connect_ms),
                ms(first_byte_ms),
                ms(rtt_ms),
                loss_pct.map_or("-".to_string(), |l| format!("{l:.2}%")),
            ) + &disk.as_ref().map_or(String::new(), |d| format!("; {d}")),
        );
    }
    None
}

/// Why the prompt could not get an answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PromptError {
    /// No `--yes` and nobody to ask.
    #[error("no terminal to ask on; pass --yes")]
    NotATerminal,
    /// Files exist here with other content, `--on-conflict ask`, and nobody to ask.
    #[error(
        "{0} already exists here; choose with --on-conflict skip|rename|overwrite (or --force)"
    )]
    Conflict(String),
    /// Reading the answer failed.
    #[error("reading the answer: {0}")]
    Io(#[from] io::Error),
}

/// What to do with one file that exists at the destination with other content.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Resolve {
    /// Keep ours; the offered one is discarded.
    Skip,
    /// Rename ours to `name (1).ext`.
    Rename,
    /// Replace ours.
    Overwrite,
}

impl Resolve {
    fn of(policy: OnConflict) -> Option<Self> {
        match policy {
            OnConflict::Ask => None,
            OnConflict::Skip => Some(Self::Skip),
            OnConflict::Rename => Some(Self::Rename),
            OnConflict::Overwrite => Some(Self::Overwrite),
        }
    }

    fn parse(answer: &str) -> Option<Self> {
        match answer.trim().to_ascii_lowercase().as_str() {
            "s" | "skip" => Some(Self::Skip),
            "r" | "rename" => Some(Self::Rename),
            "o" | "overwrite" => Some(Self::Overwrite),
            _ => None,
        }
    }
}

fn read_answer(input: &mut dyn BufRead) -> Result<String, PromptError> {
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        return Err(PromptError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(line.trim().to_ascii_lowercase())
}

/// The prompt logic with explicit streams (testable): prints the offer to `out` (up to
/// `limit` files); resolves the files of `offer.replaces` by `policy`, asking when it is
/// `ask` (all at once or one by one); then `yes` accepts, otherwise one line from `input`
/// where only `y`/`yes` (any case) accepts. `None` is a decline.
pub fn confirm(
    offer: &Offer,
    yes: bool,
    interactive: bool,
    limit: usize,
    policy: OnConflict,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<Option<Vec<Resolve>>, PromptError> {
    out.write_all(describe_offer(offer, limit).as_bytes())?;
    let mut resolved = Vec::with_capacity(offer.replaces.len());
    if let Some(first) = offer.replaces.first() {
        if let Some(r) = Resolve::of(policy) {
            resolved = vec![r; offer.replaces.len()];
        } else if !interactive {
            return Err(PromptError::Conflict(safe_name(first)));
        } else {
            let n = offer.replaces.len() as u64;
            loop {
                write!(
                    out,
                    "{} here with other content: [o]verwrite, [r]ename yours to \"name (1).ext\", \
                     [s]kip, or decide for [e]ach? ",
                    if n == 1 {
                        "1 file exists".to_string()
                    } else {
                        format!("{n} files exist")
                    }
                )?;
                out.flush()?;
                let a = read_answer(input)?;
                if let Some(r) = Resolve::parse(&a) {
                    resolved = vec![r; offer.replaces.len()];
                    break;
                }
                if a == "e" || a == "each" {
                    for name in &offer.replaces {
                        let r = loop {
                            write!(
                                out,
                                "  {}: [o]verwrite, [r]ename, [s]kip? ",
                                safe_name(name)
                            )?;
                            out.flush()?;
                            if let Some(r) = Resolve::parse(&read_answer(input)?) {
                                break r;
                            }
                        };
                        resolved.push(r);
                    }
                    break;
                }
            }
        }
    }
    if yes {
        writeln!(out, "Accepted (--yes).")?;
        return Ok(Some(resolved));
    }
    if !interactive {
        return Err(PromptError::NotATerminal);
    }
    write!(
        out,
        "Receive these files into {}? [y/N] ",
        safe_name(&offer.destination)
    )?;
    out.flush()?;
    let mut line = String::new();
    input.read_line(&mut line)?;
    let answer = line.trim().to_ascii_lowercase();
    Ok((answer == "y" || answer == "yes").then_some(resolved))
}

/// The offer as shown before the question: counts by kind, the total and the destination;
/// up to `limit` files (escaped, with size and mode); every link with its target; every file
/// that would replace an existing one; and how many are already here.
pub fn describe_offer(offer: &Offer, limit: usize) -> String {
    let plural = |n: usize, one: &str, many: &str| plural(n as u64, one, many);
    if offer.stream {
        let name = offer.files.first().map_or("stdin", |f| f.name.as_str());
        return format!(
            "The sender offers a stream (its stdin, size unknown until it ends; it cannot be \
             resumed), as {}, to {}\n",
            safe_name(name),
            safe_name(&offer.destination),
        );
    }
    let mut s = format!(
        "The sender offers {}, {} and {}, {} in all, to {}:\n",
        plural(offer.files.len(), "file", "files"),
        plural(offer.dirs, "directory", "directories"),
        plural(offer.links.len(), "link", "links"),
        HumanBytes(offer.total_bytes()),
        safe_name(&offer.destination),
    );
    for f in offer.files.iter().take(limit) {
        let _ = writeln!(
            s,
            "  {:>10}  {:04o}  {}",
            HumanBytes(f.size).to_string(),
            f.mode & 0o7777,
            safe_name(&f.name)
        );
    }
    if offer.files.len() > limit {
        let _ = writeln!(
            s,
            "  … and {} more (thru join --list shows every file)",
            offer.files.len() - limit
        );
    }
    if offer.left_out > 0 {
        let _ = writeln!(
            s,
            "  ({} left out: --include, --exclude, --select)",
            plural(offer.left_out, "file", "files")
        );
    }
    if !offer.links.is_empty() {
        // Every link, uncut: where each points matters more than how many there are.
        let _ = writeln!(s, "links:");
        for l in &offer.links {
            let _ = writeln!(s, "  {} -> {}", safe_name(&l.name), safe_name(&l.target));
        }
    }
    if !offer.replaces.is_empty() {
        // Every one, uncut: these are the user's files.
        let _ = writeln!(
            s,
            "{} here with other content (--on-conflict):",
            match offer.replaces.len() {
                1 => "1 file exists".to_string(),
                n => format!("{n} files exist"),
            }
        );
        for r in &offer.replaces {
            let _ = writeln!(s, "  {}", safe_name(r));
        }
    }
    if offer.same_size_here > 0 {
        let _ = writeln!(
            s,
            "{} already here with the same size (skipped where identical)",
            plural(offer.same_size_here, "file", "files")
        );
    }
    let n = offer.files.len();
    let _ = writeln!(
        s,
        "{n} file{}, {} total",
        if n == 1 { "" } else { "s" },
        HumanBytes(offer.total_bytes())
    );
    s
}

/// What the receiver's screen says when `p` pauses or resumes the transfer.
fn pause_text(paused: bool) -> &'static str {
    if paused {
        "Paused: the connection stays up; press p to resume"
    } else {
        "Resumed"
    }
}

/// `name` made safe for a terminal: control characters (including ESC) and bidirectional
/// overrides are shown as escapes, so a name cannot move the cursor, recolour the screen or
/// disguise its extension.
pub fn safe_name(name: &str) -> String {
    let escaped = flux_transfer::path::Escaped(name).to_string();
    let mut out = String::with_capacity(escaped.len());
    for c in escaped.chars() {
        if matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Text that may hold strings from the network (a server's error message, a peer's
/// Error or Reject reason, anything in an error chain) made safe for a terminal or a log
/// line, as [`safe_name`] does for file names: control characters (ESC, BEL, CR, LF…) and
/// bidirectional overrides are shown as escapes, so the text stays on its own line and
/// cannot retitle the window, erase lines, or fake a status line.
pub fn safe_text(text: &str) -> String {
    safe_name(text)
}

/// Which way a transfer goes, from this side's point of view.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// This side is the host, sending.
    Sending,
    /// This side is the joiner, receiving.
    Receiving,
}

impl Side {
    /// "sending to joiner 1" / "receiving from host".
    pub fn towards(self, peer: &str) -> String {
        match self {
            Self::Sending => format!("sending to {peer}"),
            Self::Receiving => format!("receiving from {peer}"),
        }
    }
}

/// Progress of one transfer; clone freely, call from any thread.
///
/// Bytes are counted in two kinds: *sent* (they crossed the network in this run) and *held*
/// (the receiver had them already: resumed chunks and files that were up to date). Only sent
/// bytes go into rates and into the "sent" figure of the summary.
#[derive(Clone, Debug)]
pub struct TransferProgress {
    inner: Arc<Mutex<ProgressInner>>,
}

#[derive(Debug)]
struct ProgressInner {
    ui: Ui,
    peer: String,
    side: Side,
    multi: MultiProgress,
    overall: ProgressBar,
    /// The rate and ETA are shown only once there is a second of data to average.
    full_style: bool,
    files: HashMap<u64, FileState>,
    overall_done: u64,
    overall_total: u64,
    sent: u64,
    /// Payload bytes on the wire (compressed chunks count their frame).
    wire: u64,
    held: u64,
    up_to_date: u64,
    files_done: u64,
    started: Instant,
    last_json: Option<Instant>,
    /// Offered files the receiver did not choose.
    left_out: u64,
}

#[derive(Debug)]
struct FileState {
    name: String,
    done: u64,
    /// Of `done`, the bytes the receiver held.
    held: u64,
    total: u64,
    bar: ProgressBar,
}

/// Width of a file name next to its bar.
const NAME_WIDTH: usize = 30;
/// Before this much time since acceptance, no rate or ETA is shown: a first sample of a few
/// milliseconds gives wild figures.
const RATE_AFTER: Duration = Duration::from_secs(1);

/// `name` cut to `width` characters with an ellipsis in the middle, so both the start of the
/// path and the extension stay visible.
pub fn ellipsize(name: &str, width: usize) -> String {
    let n = name.chars().count();
    if n <= width || width < 3 {
        return name.to_string();
    }
    let tail = (width - 1) / 2;
    let head = width - 1 - tail;
    let start: String = name.chars().take(head).collect();
    let end: String = name.chars().skip(n - tail).collect();
    format!("{start}…{end}")
}

fn overall_style(full: bool) -> ProgressStyle {
    let template = if full {
        "{prefix:>16} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}"
    } else {
        "{prefix:>16} [{bar:30}] {bytes}/{total_bytes} {msg}"
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Milliseconds since the Unix epoch (progress timestamps).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// "1 file", "2 files".
pub fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl TransferProgress {
    /// File `id` (any number unique within the transfer) starts; `size` bytes in all. A
    /// second call for the same id does nothing.
    pub fn file_started(&self, id: u64, name: &str, size: u64) {
        let mut g = self.lock();
        if g.files.contains_key(&id) {
            return;
        }
        let bar = g.multi.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template("{msg:>30} [{bar:30}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let safe = safe_name(name);
        bar.set_message(ellipsize(&safe, NAME_WIDTH));
        g.files.insert(
            id,
            FileState {
                name: safe,
                done: 0,
                held: 0,
                total: size,
                bar,
            },
        );
    }

    /// File `id` (a stream, whose size is learned as it arrives) is `by` bytes larger than
    /// thought, and so is the whole transfer.
    pub fn grow(&self, id: u64, by: u64) {
        let mut g = self.lock();
        let g = &mut *g;
        let Some(f) = g.files.get_mut(&id) else {
            return;
        };
        f.total += by;
        f.bar.set_length(f.total);
        g.overall_total += by;
        g.overall.set_length(g.overall_total);
    }

    /// Prints `text` above the bars: a line written straight to the terminal would be drawn
    /// over by their next redraw.
    pub fn say(&self, text: &str) {
        let g = self.lock();
        if g.multi.is_hidden() {
            g.ui.say(text);
        } else {
            let _ = g.multi.println(safe_text(text));
        }
    }

    /// This side paused (`true`) or resumed the transfer (`p`): a `pause` event under `--json`,
    /// else a line above the bars.
    pub fn paused(&self, paused: bool) {
        let (ui, peer) = {
            let g = self.lock();
            (g.ui.clone(), g.peer.clone())
        };
        match ui.mode() {
            Mode::Json => ui.pause(&peer, paused, true),
            Mode::Human { .. } => self.say(pause_text(paused)),
        }
    }

    /// `len` bytes of file `id` crossed the network. Unknown ids are ignored.
    pub fn sent(&self, id: u64, len: u64) {
        self.add(id, len, false);
    }

    /// `len` payload bytes went over the wire (fewer than the file bytes when compressed).
    pub fn wire(&self, len: u64) {
        self.lock().wire += len;
    }

    /// `len` bytes of file `id` were already at the receiver (resumed). Unknown ids are ignored.
    pub fn held(&self, id: u64, len: u64) {
        self.add(id, len, true);
    }

    /// Bytes of file `id` accounted so far (sent or held), if it started.
    pub fn file_bytes(&self, id: u64) -> Option<(u64, u64)> {
        self.lock().files.get(&id).map(|f| (f.done, f.total))
    }

    fn add(&self, id: u64, len: u64, held: bool) {
        let mut g = self.lock();
        let g = &mut *g;
        let Some(f) = g.files.get_mut(&id) else {
            return;
        };
        // Never past the end.
        let delta = len.min(f.total.saturating_sub(f.done));
        f.done += delta;
        if held {
            f.held += delta;
        }
        f.bar.set_position(f.done);
        let (file, done, total) = (f.name.clone(), f.done, f.total);
        g.overall_done = g.overall_done.saturating_add(delta);
        if held {
            g.held += delta;
        } else {
            g.sent += delta;
        }
        g.overall.set_position(g.overall_done);
        let elapsed = g.started.elapsed();
        if !g.full_style && elapsed >= RATE_AFTER {
            g.full_style = true;
            g.overall.set_style(overall_style(true));
        }
        let now = Instant::now();
        if g.ui.mode == Mode::Json
            && g.last_json
                .is_none_or(|t| now.duration_since(t) >= JSON_PROGRESS_EVERY)
        {
            g.last_json = Some(now);
            let secs = elapsed.as_secs_f64();
            let rate = (elapsed >= RATE_AFTER).then(|| g.sent as f64 / secs);
            let eta = rate
                .filter(|r| *r > 0.0)
                .map(|r| (g.overall_total - g.overall_done) as f64 / r);
            emit_json(&Event::Progress {
                peer: g.peer.clone(),
                file,
                done,
                total,
                overall_done: g.overall_done,
                overall_total: g.overall_total,
                sent_bytes: g.sent,
                rate_bytes_per_s: rate,
                eta_s: eta,
                elapsed_s: secs,
                ts_ms: unix_ms(),
            });
        }
    }

    /// File `id` is complete and verified. Whatever of it was not counted as sent was held by
    /// the receiver; `up_to_date` means the whole file was (nothing of it was sent).
    pub fn file_done(&self, id: u64, up_to_date: bool) {
        let gap = self
            .lock()
            .files
            .get(&id)
            .map(|f| f.total.saturating_sub(f.done));
        if let Some(gap) = gap {
            self.held(id, gap);
        }
        let mut g = self.lock();
        if let Some(f) = g.files.remove(&id) {
            f.bar.finish_and_clear();
            g.multi.remove(&f.bar);
            g.files_done += 1;
            if up_to_date {
                // An up-to-date file is counted as such, not as resumed bytes.
                g.up_to_date += 1;
                g.held -= f.held.min(g.held);
            }
            let peer = g.peer.clone();
            g.ui.emit(&Event::FileDone {
                peer,
                file: f.name,
                bytes: f.total,
                up_to_date,
            });
        }
    }

    /// Clears the display after a failure, with no summary.
    pub fn abandon(&self) {
        let g = self.lock();
        for f in g.files.values() {
            f.bar.finish_and_clear();
        }
        g.overall.finish_and_clear();
        let _ = g.multi.clear();
    }

    /// Shows the route next to the overall progress.
    pub fn set_route(&self, route: Route) {
        self.lock().overall.set_message(route.to_string());
    }

    /// Bytes in place so far (sent and already held).
    pub fn done_bytes(&self) -> u64 {
        self.lock().overall_done
    }

    /// Offered files the receiver did not choose, for the summary.
    pub fn set_left_out(&self, n: u64) {
        self.lock().left_out = n;
    }

    /// Ends the display (no bar stays behind) and reports the summary.
    pub fn finish(
        &self,
        route: Route,
        path: Option<RoutePath>,
        synced_seconds: Option<f64>,
    ) -> Summary {
        let g = self.lock();
        for f in g.files.values() {
            f.bar.finish_and_clear();
            g.multi.remove(&f.bar);
        }
        g.overall.finish_and_clear();
        let _ = g.multi.clear();
        let summary = Summary {
            peer: g.peer.clone(),
            side: g.side,
            files: g.files_done,
            up_to_date: g.up_to_date,
            bytes: g.overall_total,
            sent_bytes: g.sent,
            wire_bytes: g.wire,
            resumed_bytes: g.held,
            seconds: g.started.elapsed().as_secs_f64(),
            route,
            path,
            synced_seconds,
            left_out: g.left_out,
        };
        match g.ui.mode {
            Mode::Json => emit_json(&Event::Summary(summary.clone())),
            Mode::Human { .. } => g.ui.say(&summary.line()),
        }
        summary
    }

    fn lock(&self) -> MutexGuard<'_, ProgressInner> {
        // A panic elsewhere while holding the lock leaves display state only; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Summary {
    /// The summary for people: "Sent 7 files to joiner 1: 3 up to date, 43.0 MiB resumed,
    /// 7.00 MiB sent in 0.4 s (17.5 MiB/s), route: direct (LAN)".
    pub fn line(&self) -> String {
        let (verb, dir, moved) = match self.side {
            Side::Sending => ("Sent", "to", "sent"),
            Side::Receiving => ("Received", "from", "received"),
        };
        let mut parts = Vec::new();
        if self.up_to_date > 0 {
            parts.push(format!("{} up to date", self.up_to_date));
        }
        if self.resumed_bytes > 0 {
            parts.push(format!("{} resumed", HumanBytes(self.resumed_bytes)));
        }
        let rate = self.sent_bytes as f64 / self.seconds.max(1e-9);
        let wire = if self.wire_bytes < self.sent_bytes {
            format!(" ({} on the wire, zstd)", HumanBytes(self.wire_bytes))
        } else {
            String::new()
        };
        parts.push(format!(
            "{} {moved}{wire} in {:.1} s ({}/s)",
            HumanBytes(self.sent_bytes),
            self.seconds,
            HumanBytes(rate as u64)
        ));
        if self.left_out > 0 {
            parts.push(format!(
                "{} left out",
                plural(self.left_out, "file", "files")
            ));
        }
        let synced = self
            .synced_seconds
            .map_or(String::new(), |s| format!(", synced to disk in {s:.2} s"));
        format!(
            "{verb} {} {dir} {}: {}, route: {}{synced}",
            plural(self.files, "file", "files"),
            self.peer,
            parts.join(", "),
            self.route
        )
    }
}

/// Files listed in the prompt before "… and N more", unless `thru join --list`.
pub const LIST_LIMIT: usize = 40;
/// Least time between two JSON progress lines.
const JSON_PROGRESS_EVERY: Duration = Duration::from_millis(250);

fn emit_json(event: &Event) {
    if let Ok(line) = serde_json::to_string(event) {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

fn banner_text(version: &str) -> String {
    format!(
        " _   _                \n| |_| |__  _ __ _   _ \n| __| '_ \\| '__| | | |\n| |_| | | | |  | |_| |\n \\__|_| |_|_|   \\__,_|  thruflux {version}"
    )
}

/// Startup sayings: every transfer begins with a good omen.
const SAYINGS: &[&str] = &[
    "May your packets arrive in order and your NATs be kind.",
    "The shortest path between two disks is a straight line.",
    "Fortune favours the directly connected.",
    "No relay today: the road is clear.",
    "Bytes are lighter when they travel together.",
    "Every checksum matches on a good day, and today is a good day.",
    "Measure twice, send once.",
    "The wind is at your back and the congestion window is wide open.",
];

/// A saying picked by `seed`.
pub fn saying(seed: u64) -> &'static str {
    SAYINGS[(seed % SAYINGS.len() as u64) as usize]
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer {
            files: vec![
                OfferedFile {
                    name: "photos/a.jpg".into(),
                    size: 1536,
                    mode: 0o644,
                },
                OfferedFile {
                    name: "evil\u{1b}[2Jname\u{202e}gpj.exe".into(),
                    size: 3 << 30,
                    mode: 0o644,
                },
            ],
            links: Vec::new(),
            dirs: 1,
            destination: "/home/me/in".into(),
            replaces: Vec::new(),
            same_size_here: 0,
            entries: Vec::new(),
            left_out: 0,
            stream: false,
        }
    }

    fn ask_with(
        offer: &Offer,
        yes: bool,
        interactive: bool,
        policy: OnConflict,
        answer: &str,
    ) -> (Result<Option<Vec<Resolve>>, PromptError>, String) {
        let mut input = io::Cursor::new(answer.as_bytes().to_vec());
        let mut out = Vec::new();
        let r = confirm(
            offer,
            yes,
            interactive,
            LIST_LIMIT,
            policy,
            &mut input,
            &mut out,
        );
        (r, String::from_utf8(out).unwrap())
    }

    fn ask(yes: bool, interactive: bool, answer: &str) -> (Result<bool, PromptError>, String) {
        let (r, text) = ask_with(&offer(), yes, interactive, OnConflict::Ask, answer);
        (r.map(|a| a.is_some()), text)
    }

    /// Conflicts are resolved for all at once or file by file; a policy answers without
    /// asking; with nobody to ask and `ask`, it is a conflict error (issue 15).
    #[test]
    fn conflicts_are_asked_for_all_or_each() {
        let mut o = offer();
        o.replaces = vec!["a.txt".into(), "b.txt".into()];
        let (r, text) = ask_with(&o, false, true, OnConflict::Ask, "x\nr\ny\n");
        assert_eq!(r.unwrap(), Some(vec![Resolve::Rename; 2]));
        assert!(
            text.contains("2 files exist here with other content"),
            "{text}"
        );
        assert!(
            text.contains("[r]ename yours to \"name (1).ext\""),
            "{text}"
        );
        assert!(
            text.contains("Receive these files into /home/me/in? [y/N]"),
            "{text}"
        );
        let (r, text) = ask_with(&o, false, true, OnConflict::Ask, "e\ns\no\ny\n");
        assert_eq!(r.unwrap(), Some(vec![Resolve::Skip, Resolve::Overwrite]));
        assert!(
            text.contains("  b.txt: [o]verwrite, [r]ename, [s]kip?"),
            "{text}"
        );
        let (r, _) = ask_with(&o, true, false, OnConflict::Skip, "");
        assert_eq!(r.unwrap(), Some(vec![Resolve::Skip; 2]));
        let (r, _) = ask_with(&o, true, false, OnConflict::Ask, "");
        assert!(matches!(r, Err(PromptError::Conflict(p)) if p == "a.txt"));
        // Declining after resolving is still a decline.
        let (r, _) = ask_with(&o, false, true, OnConflict::Ask, "o\nn\n");
        assert_eq!(r.unwrap(), None);
    }

    #[test]
    fn prompt_shows_safe_names_count_and_total() {
        let (r, text) = ask(false, true, "y\n");
        assert!(r.unwrap());
        assert!(text.contains("photos/a.jpg"), "{text}");
        assert!(text.contains("1.50 KiB"), "{text}");
        assert!(text.contains("2 files, 3.00 GiB total"), "{text}");
        assert!(
            !text.contains('\u{1b}'),
            "escape reached the terminal: {text:?}"
        );
        assert!(
            !text.contains('\u{202e}'),
            "bidi override reached the terminal"
        );
        assert!(text.contains("\\u{1b}[2J"), "{text}");
        assert!(text.contains("[y/N]"), "{text}");
    }

    #[test]
    fn links_are_listed_with_their_targets() {
        let mut o = offer();
        o.links = (0..50)
            .map(|i| OfferedLink {
                name: format!("l{i}"),
                target: format!("../t{i}"),
            })
            .collect();
        o.links.push(OfferedLink {
            name: "notes.txt".into(),
            target: "a1/l1/../etc/passwd\u{1b}[2J".into(),
        });
        let text = describe_offer(&o, 40);
        assert!(text.contains("links:\n"), "{text}");
        assert!(
            text.contains("  l49 -> ../t49\n"),
            "every link is listed: {text}"
        );
        assert!(
            text.contains("  notes.txt -> a1/l1/../etc/passwd\\u{1b}[2J\n"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'), "{text:?}");
    }

    #[test]
    fn network_text_is_escaped_for_the_terminal() {
        let evil = "\u{1b}]0;owned title\u{7}\u{1b}[2K\r\nDone: 3 files received, all verified";
        let safe = safe_text(evil);
        assert!(!safe.chars().any(char::is_control), "{safe:?}");
        assert!(safe.contains("\\u{1b}]0;owned title\\u{7}"), "{safe}");
        assert!(safe.contains("Done: 3 files received"), "{safe}");
        assert_eq!(safe_text("plain: text"), "plain: text");
    }

    #[test]
    fn default_is_no() {
        for answer in ["\n", "", "n\n", "nope\n", "Y es\n"] {
            assert!(!ask(false, true, answer).0.unwrap(), "{answer:?}");
        }
        for answer in ["y\n", "YES\n", " Yes \n"] {
            assert!(ask(false, true, answer).0.unwrap(), "{answer:?}");
        }
    }

    #[test]
    fn yes_accepts_and_non_tty_refuses() {
        assert!(ask(true, false, "").0.unwrap());
        let err = ask(false, false, "y\n").0.unwrap_err();
        assert!(matches!(err, PromptError::NotATerminal));
        assert!(err.to_string().contains("--yes"));
    }

    #[test]
    fn long_lists_are_cut() {
        let o = Offer {
            files: (0..100)
                .map(|i| OfferedFile {
                    name: format!("f{i}"),
                    size: 1,
                    mode: 0o644,
                })
                .collect(),
            ..Offer::default()
        };
        let text = describe_offer(&o, 40);
        assert!(text.contains("… and 60 more (thru join --list"), "{text}");
        assert!(text.contains("100 files, 100 B total"), "{text}");
        // --list: every file.
        let all = describe_offer(&o, usize::MAX);
        assert!(all.contains("  f99\n"), "{all}");
        assert!(!all.contains("more"), "{all}");
    }

    /// The prompt shows counts by kind, the destination, the total, modes, every link, every
    /// file it would replace and how many are already here (issue 13, item 5).
    #[test]
    fn the_prompt_hides_nothing_that_matters() {
        let mut o = offer();
        o.files[0].mode = 0o4755;
        o.dirs = 3;
        o.links = vec![OfferedLink {
            name: "latest".into(),
            target: "photos".into(),
        }];
        o.replaces = (0..45).map(|i| format!("old{i}.txt")).collect();
        o.same_size_here = 2;
        let text = describe_offer(&o, 1);
        assert!(
            text.starts_with(
                "The sender offers 2 files, 3 directories and 1 link, 3.00 GiB in all, to /home/me/in:"
            ),
            "{text}"
        );
        assert!(text.contains("4755  photos/a.jpg"), "{text}");
        assert!(text.contains("  latest -> photos\n"), "{text}");
        assert!(
            text.contains("45 files exist here with other content (--on-conflict):"),
            "{text}"
        );
        assert!(
            text.contains("  old44.txt\n"),
            "every replaced file: {text}"
        );
        assert!(
            text.contains("2 files already here with the same size"),
            "{text}"
        );
    }

    #[test]
    fn events_serialize_with_an_event_tag() {
        let e = Event::Code {
            code: "K7QF2M-XD4P-RT9A".into(),
            words: "K7QF2M-able-able-able-able-able".into(),
            mode: "lan",
            peer_hint: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"code","code":"K7QF2M-XD4P-RT9A","words":"K7QF2M-able-able-able-able-able","mode":"lan"}"#
        );
        let s = Event::Summary(Summary {
            peer: "host".into(),
            side: Side::Receiving,
            files: 2,
            up_to_date: 0,
            bytes: 10,
            sent_bytes: 10,
            wire_bytes: 10,
            resumed_bytes: 0,
            seconds: 1.5,
            route: Route::LanDirect,
            path: None,
            synced_seconds: None,
            left_out: 0,
        });
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["event"], "summary");
        assert_eq!(v["route"], "lan_direct");
        assert!(v.get("path").is_none());
        // Through NATs: the pair, in the fields scripts read.
        let sel = flux_ice::Selected {
            local: "10.0.1.2:5000".parse().unwrap(),
            remote: "198.51.100.12:6000".parse().unwrap(),
            kind: flux_ice::RouteKind::Srflx,
            local_kind: flux_ice::CandidateKind::Host,
            remote_kind: flux_ice::CandidateKind::Srflx,
            transport: flux_ice::TurnTransport::Udp,
        };
        let path = RoutePath::new(&sel, Duration::from_millis(142));
        let r = Event::Route {
            peer: "joiner 1".into(),
            route: Route::of(sel.kind),
            path: path.clone(),
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["event"], "route");
        assert_eq!(v["route"], "hole_punched");
        assert_eq!(v["kind"], "srflx");
        assert_eq!(v["local"], "host");
        assert_eq!(v["remote"], "srflx");
        assert_eq!(v["transport"], "udp");
        assert_eq!(v["family"], "v4");
        assert_eq!(v["remote_addr"], "198.51.100.12:6000");
        assert!((v["connect_ms"].as_f64().unwrap() - 142.0).abs() < 1e-6);
        assert!(path.to_string().contains("host → srflx over udp (v4)"));
    }

    /// Held (resumed, up-to-date) bytes are counted apart from sent ones, and the summary
    /// line says so (issue 15).
    #[test]
    fn progress_keeps_sent_and_held_apart() {
        let ui = Ui::with_mode(Mode::Human { fancy: false });
        let p = ui.transfer("joiner 1", Side::Sending, 3, 600);
        p.file_started(1, "a", 100);
        p.file_started(2, "b", 200);
        p.file_started(3, "c", 300);
        p.held(1, 60);
        p.sent(1, 50); // only 40 were missing
        p.sent(2, 150);
        p.sent(9, 999); // unknown id
        p.wire(190);
        p.file_done(1, false);
        p.file_done(2, false); // the last 50 were held
        p.file_done(3, true);
        let s = p.finish(Route::LanDirect, None, None);
        assert_eq!((s.files, s.up_to_date, s.bytes), (3, 1, 600));
        assert_eq!((s.sent_bytes, s.resumed_bytes), (190, 110));
        let mut zipped = s.clone();
        zipped.wire_bytes = 19;
        let line = zipped.line();
        assert!(
            line.contains("190 B sent (19 B on the wire, zstd) in"),
            "{line}"
        );
        let line = s.line();
        assert!(
            line.starts_with(
                "Sent 3 files to joiner 1: 1 up to date, 110 B resumed, 190 B sent in"
            ),
            "{line}"
        );
        let one = Summary {
            files: 1,
            up_to_date: 0,
            resumed_bytes: 0,
            side: Side::Receiving,
            ..s
        };
        assert!(
            one.line()
                .starts_with("Received 1 file from joiner 1: 190 B received")
        );
    }

    #[test]
    fn long_names_get_an_ellipsis_in_the_middle() {
        assert_eq!(ellipsize("short.txt", 30), "short.txt");
        let cut = ellipsize("photos/2024/a-very-long-holiday-name.jpeg", 20);
        assert_eq!(cut.chars().count(), 20);
        assert!(cut.starts_with("photos/2") && cut.ends_with("name.jpeg") && cut.contains('…'));
    }

    /// docs/json-events.md lists exactly the events and fields the code emits (issue 15).
    #[test]
    fn json_events_match_their_documentation() {
        use std::collections::{BTreeMap, BTreeSet};
        let doc = include_str!("../docs/json-events.md");
        let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in doc.lines() {
            if let Some(name) = line.strip_prefix("### `") {
                let name = name.trim_end_matches('`').to_string();
                documented.insert(name.clone(), BTreeSet::new());
                current = Some(name);
            } else if let (Some(ev), Some(row)) = (&current, line.strip_prefix("| `")) {
                let field = row.split('`').next().unwrap().to_string();
                documented.get_mut(ev).unwrap().insert(field);
            }
        }
        let mut emitted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for e in sample_events() {
            let v = serde_json::to_value(&e).unwrap();
            let obj = v.as_object().unwrap();
            let name = obj["event"].as_str().unwrap().to_string();
            let fields = obj.keys().filter(|k| *k != "event").cloned().collect();
            emitted.insert(name, fields);
        }
        assert_eq!(
            documented, emitted,
            "docs/json-events.md and the code disagree"
        );
        assert!(
            doc.contains(&format!("{JSON_SCHEMA} at present")),
            "schema version"
        );
    }

    /// The benchmark line names the side and the direction, and uses one unit family.
    #[test]
    fn benchmark_line_has_one_unit_family_and_the_side() {
        let e = sample_events()
            .into_iter()
            .find(|e| matches!(e, Event::Benchmark { .. }))
            .unwrap();
        let line = human_line(&e).unwrap();
        assert!(
            line.starts_with("Benchmark (receiving from host): "),
            "{line}"
        );
        assert!(line.contains("MiB/s") && !line.contains("bit/s"), "{line}");
    }

    #[test]
    fn sayings_cover_the_list() {
        assert_ne!(saying(0), saying(1));
        assert!(banner_text("1.2.3").contains("1.2.3"));
    }

    /// One sample of every `--json` event, with every optional field present: the documentation
    /// test compares their fields with docs/json-events.md.
    fn sample_events() -> Vec<Event> {
        let path = RoutePath {
            kind: "srflx",
            local: "host",
            remote: "srflx",
            transport: "udp",
            family: "v4",
            local_addr: "10.0.0.2:5000".into(),
            remote_addr: "198.51.100.7:6000".into(),
            connect_ms: 120.0,
        };
        let summary = Summary {
            peer: "joiner 1".into(),
            side: Side::Sending,
            files: 3,
            up_to_date: 1,
            bytes: 300,
            sent_bytes: 200,
            wire_bytes: 120,
            resumed_bytes: 50,
            seconds: 1.0,
            route: Route::HolePunched,
            path: Some(path.clone()),
            synced_seconds: Some(0.25),
            left_out: 2,
        };
        let all = vec![
            Event::Start {
                schema: JSON_SCHEMA,
                version: "1.0.0",
                role: Role::Host,
            },
            Event::Offering {
                files: 3,
                bytes: 300,
                text_bytes: Some(0),
            },
            Event::Text {
                peer: "host".into(),
                text: "hi".into(),
                bytes: 2,
            },
            Event::Code {
                code: "K7QF2M-XD4P-RT9A".into(),
                words: "K7QF2M-able-able-able-able-able".into(),
                mode: "lan",
                peer_hint: Some("192.168.1.2:47115".into()),
            },
            Event::Peer {
                role: Role::Host,
                peer: "joiner 1".into(),
                rendezvous: Rendezvous::LanDirect,
                fingerprint: "ab".into(),
                local_fingerprint: "cd".into(),
                addrs: vec!["192.168.1.3:5000".into()],
            },
            Event::Route {
                peer: "joiner 1".into(),
                route: Route::HolePunched,
                path: path.clone(),
            },
            Event::PairingFailed {
                peer: "joiner 2".into(),
                error: "wrong code".into(),
            },
            Event::Offer {
                entries: vec![OfferEntry {
                    path: "a".into(),
                    size: 1,
                    kind: "file",
                }],
                files: 1,
                bytes: 1,
                dirs: 0,
                links: Vec::new(),
                replaces: Vec::new(),
                same_size_here: 0,
                destination: "/in".into(),
                left_out: 1,
            },
            Event::Listing {
                entries: vec![OfferEntry {
                    path: "a".into(),
                    size: 1,
                    kind: "file",
                }],
                files: 1,
                bytes: 1,
                dirs: 0,
                links: Vec::new(),
            },
            Event::Accepted {
                peer: "host".into(),
                files: 1,
                bytes: 1,
            },
            Event::Declined {
                peer: "joiner 1".into(),
                reason: "the receiver declined".into(),
            },
            Event::Receiver {
                peer: "joiner 1".into(),
                state: ReceiverState::Gone,
                reason: Some("the receiver went away".into()),
            },
            Event::Pause {
                peer: "host".into(),
                paused: true,
            },
            Event::Progress {
                peer: "host".into(),
                file: "a".into(),
                done: 1,
                total: 2,
                overall_done: 1,
                overall_total: 2,
                sent_bytes: 1,
                rate_bytes_per_s: Some(1.0),
                eta_s: Some(1.0),
                elapsed_s: 1.0,
                ts_ms: 1,
            },
            Event::FileDone {
                peer: "host".into(),
                file: "a".into(),
                bytes: 2,
                up_to_date: false,
            },
            Event::Summary(summary),
            Event::HostSummary {
                receivers_done: 1,
                receivers_failed: 0,
                sent_bytes: 2,
                seconds: 1.0,
            },
            Event::Benchmark {
                peer: "host".into(),
                side: Side::Receiving,
                bytes: 2,
                wire_bytes: 1,
                avg_gbit_s: 1.0,
                peak_1s_gbit_s: 1.0,
                connect_ms: Some(1.0),
                first_byte_ms: Some(1.0),
                rtt_ms: Some(1.0),
                loss_pct: Some(0.0),
                cpu_s: 0.1,
                quic: "s2n",
                path: Some(path),
                disk: Some("buffered writes".into()),
            },
            Event::Error {
                message: "m".into(),
                hint: Some("h".into()),
                exit_code: 1,
            },
            Event::WebLink {
                url: "https://relay.example/w/abc#key".into(),
                curl: Vec::new(),
                mode: "e2e",
            },
            Event::Warning {
                message: "m".into(),
            },
        ];
        // Exhaustive on purpose: a new event does not compile until it has a sample (and so a
        // documented entry).
        for e in &all {
            match e {
                Event::Start { .. }
                | Event::Offering { .. }
                | Event::Code { .. }
                | Event::Peer { .. }
                | Event::Route { .. }
                | Event::PairingFailed { .. }
                | Event::Offer { .. }
                | Event::Listing { .. }
                | Event::Text { .. }
                | Event::Accepted { .. }
                | Event::Declined { .. }
                | Event::Receiver { .. }
                | Event::Pause { .. }
                | Event::Progress { .. }
                | Event::FileDone { .. }
                | Event::Summary(_)
                | Event::HostSummary { .. }
                | Event::Benchmark { .. }
                | Event::WebLink { .. }
                | Event::Warning { .. }
                | Event::Error { .. } => {}
            }
        }
        all
    }
}
