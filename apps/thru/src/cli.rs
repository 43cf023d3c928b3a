//! The command line: one clap definition from which `--help`, the man page (`thru man`) and
//! shell completions (`thru completions SHELL`) are all generated.
//!
//! Every flag also reads a `THRU_*` environment variable (shown in `--help`). The join code
//! can come from `THRU_CODE` instead of argv, so it does not show in `ps` or shell history.
//!
//! This module only parses and validates values (sizes, ranges); turning flags into a plan
//! is `main.rs`'s job.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

use crate::transfer::{DiskChoice, IoDriver, QuicChoice};

/// Exit codes, stable for scripts (also listed in `--help`).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[repr(u8)]
pub enum Exit {
    /// Everything was transferred (or the command did what was asked).
    Ok = 0,
    /// The transfer failed or is incomplete (run `thru join` again to resume).
    TransferFailed = 1,
    /// Bad flags, a malformed join code or server URL, an unreadable path, an unusable
    /// `--out`, or no terminal to ask on and no `--yes`: found before any network step.
    Usage = 2,
    /// Pairing failed: wrong code, tampering detected, no such session, peer unreachable.
    PairingFailed = 3,
    /// The offer was refused: the receiver declined (both sides exit 4) or has too little
    /// free space.
    Refused = 4,
    /// A file to receive exists with other content, `--on-conflict ask`, and nobody to ask.
    Conflict = 5,
    /// Stopped with Ctrl-C (the peer is told at once).
    Interrupted = 130,
}

impl Exit {
    /// The numeric code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The exit-code table shown in `--help` and the man page.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  transfer failed or incomplete (run thru join again to resume)
  2  usage error, found before any network step (bad flag, malformed code or URL,
     unreadable path, unusable --out, no terminal to ask on and no --yes)
  3  pairing failed (wrong code, tampering detected, no such session, peer unreachable)
  4  refused: the receiver declined (both sides exit 4) or lacks free space
  5  conflict: a file exists here with other content and nobody to ask (--on-conflict)
  130  stopped with Ctrl-C (the other side is told at once)";

const AFTER_HELP: &str = "\
Examples:
  thru host photos/ notes.txt          offer a directory and a file on the LAN
  thru join H3WN8C-5RJE-P2VD           receive them into the current directory
  thru join                            ask for the code without echoing it
  thru send big.iso --server wss://relay.example.org
                                       through a signaling server, across NATs
  thru receive CODE -o ~/in --yes      no questions (scripts)
  thru config                          what is configured, and where it came from

With no --server, thru works on the local network: the host advertises itself with mDNS
and the joiner finds it by the code (or reaches it with --peer ADDR). With --server URL,
both sides pair through a thruserv signaling server. Either way the code's secret part
never leaves the two machines: host and joiner run a PAKE over it and pin each other's
certificates, so neither the server nor anything in between can read or alter a transfer.

Defaults can be set in $XDG_CONFIG_HOME/thru/config.toml (see `thru config`); a flag beats
its THRU_* environment variable, which beats the file, which beats the built-in default.

Exit codes:
  0  done
  1  transfer failed or incomplete (run thru join again to resume)
  2  usage error, found before any network step (bad flag, malformed code or URL,
     unreadable path, unusable --out, no terminal to ask on and no --yes)
  3  pairing failed (wrong code, tampering detected, no such session, peer unreachable)
  4  refused: the receiver declined (both sides exit 4) or lacks free space
  5  conflict: a file exists here with other content and nobody to ask (--on-conflict)
  130  stopped with Ctrl-C (the other side is told at once)";

const HOST_EXAMPLES: &str = "\
Examples:
  thru host photos/                    one receiver on the LAN, then exit
  thru host --max-receivers 3 slides.pdf
                                       serve three receivers with the same code
  thru host --server wss://relay.example.org --json data/ | jq .
                                       across the internet, events for a script";

const JOIN_EXAMPLES: &str = "\
Examples:
  thru join                            ask for the code (hidden), receive here
  thru join H3WN8C-5RJE-P2VD -o ~/in   receive into ~/in (created if missing)
  thru join CODE --peer 192.168.1.20   when mDNS cannot reach the host
  thru join CODE --yes --on-conflict rename
                                       no questions; keep both on a name clash
  thru join CODE --list                see what is offered, receive nothing
  thru join CODE --include 'docs/**' --exclude '*.tmp'
                                       receive only part of the offer
  thru join CODE --select              tick the files to receive";

/// Thruflux: move files between two machines, directly, end-to-end encrypted, resumable.
#[derive(Debug, Parser)]
#[command(
    name = "thru",
    version,
    disable_version_flag = true,
    after_help = AFTER_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// Print the version and exit.
    #[arg(short = 'V', long = "version", action = ArgAction::Version, global = true,
          help_heading = "Output")]
    pub version: Option<bool>,

    /// One JSON object per line on stdout (events and fields: apps/thru/docs/json-events.md);
    /// no banner, no bars, no prompt (a joiner needs --yes); stderr carries only logs.
    #[arg(help_heading = "Output", long, global = true, env = "THRU_JSON")]
    pub json: bool,

    /// More log output on stderr (repeat for more; RUST_LOG overrides).
    #[arg(help_heading = "Output", short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,

    /// Only errors on stderr.
    #[arg(
        help_heading = "Output",
        short,
        long,
        global = true,
        env = "THRU_QUIET"
    )]
    pub quiet: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Offer files and directories; prints a join code and waits for the receiver.
    #[command(visible_alias = "send", after_help = HOST_EXAMPLES)]
    Host(HostArgs),
    /// Receive what a host offers, given its join code (asked for when not given).
    #[command(visible_alias = "receive", after_help = JOIN_EXAMPLES)]
    Join(JoinArgs),
    /// Print the effective configuration and where each value comes from.
    Config,
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write the man pages, one for thru and one per subcommand, into DIR (or all of them to
    /// stdout without DIR).
    Man {
        /// Directory to write the pages into.
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Flags for `thru host`.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// Files and directories to offer; `-` alone sends stdin as one file, streamed as it is
    /// read (`tar c dir | thru host -`). A stream goes to one receiver and cannot be resumed.
    #[arg(required_unless_present = "text", value_name = "PATH")]
    pub paths: Vec<PathBuf>,

    /// With `-`: the name the stream arrives under (default `stdin`).
    #[arg(help_heading = "Basics", long, value_name = "NAME")]
    pub name: Option<String>,

    /// Send a short text instead of files (at most 64 KiB; `-` reads it from stdin). The
    /// joiner prints it to stdout after the same pairing and prompt as for files.
    #[arg(
        help_heading = "Basics",
        long,
        conflicts_with = "paths",
        value_name = "TEXT"
    )]
    pub text: Option<String>,

    /// Compress file data with zstd: `auto` samples each file and compresses only where it
    /// pays (never media, archives or random data), `on` wherever a chunk gets smaller, `off`
    /// never. The level follows the path: level 1 on fast links, stronger ones as the path's
    /// rate drops and CPU becomes the cheaper thing to spend. Chunks are hashed as plain bytes, so resume and skipping are unaffected; a
    /// joiner too old for compression simply gets plain bytes.
    #[arg(help_heading = "Tuning", long, env = "THRU_COMPRESS", value_enum,
          default_value_t = CompressChoice::Auto, value_name = "WHEN")]
    pub compress: CompressChoice,

    /// Receivers served before exiting (each pairs separately with the same code). The
    /// default, 1, exits after the first transfer, as croc and wormhole do.
    #[arg(help_heading = "Basics", long, env = "THRU_MAX_RECEIVERS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_receivers: u32,

    /// Print the code's secret as five words (K7QF2M-delta-maple-river-tiger-wolf), easier to
    /// read aloud; the same code, and joiners may type either form.
    #[arg(help_heading = "Basics", long, env = "THRU_WORDS")]
    pub words: bool,

    /// Chunk size, 256KiB..4MiB and a multiple of 4KiB (default: chosen from the largest file).
    #[arg(help_heading = "Tuning", long, env = "THRU_CHUNK_SIZE", value_parser = parse_chunk_size, value_name = "SIZE")]
    pub chunk_size: Option<u64>,

    /// Share through the server's web relay (thruserv --web-relay) with someone who has only
    /// a browser: prints a link whose page decrypts in the browser (the key stays in the
    /// link's #fragment, which browsers never send). Needs --server. Runs until Ctrl-C or
    /// the relay's lifetime ends.
    #[arg(help_heading = "Web", long, env = "THRU_WEB")]
    pub web: bool,

    /// With --web: no encryption, so curl can download (prints the commands). The server
    /// sees names and contents.
    #[arg(help_heading = "Web", long, env = "THRU_PLAIN", requires = "web")]
    pub plain: bool,

    /// With --web: also print the link as a QR code, for a phone.
    #[arg(help_heading = "Web", long, env = "THRU_QR", requires = "web")]
    pub qr: bool,

    /// Files sent at once, 1..8 (each a QUIC stream lane).
    #[arg(help_heading = "Tuning", long, env = "THRU_PARALLEL_FILES", default_value_t = 4,
          value_parser = clap::value_parser!(u8).range(1..=8))]
    pub parallel_files: u8,

    /// Shared network and engine flags.
    #[command(flatten)]
    pub net: NetArgs,
}

/// Flags for `thru join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The join code the host printed (or set THRU_CODE to keep it out of argv).
    #[arg(env = "THRU_CODE", hide_env_values = true, value_name = "CODE")]
    pub code: Option<String>,

    /// Directory to receive into; `-` writes a single-file offer to stdout, in order (an
    /// offer of several files is refused before anything is written).
    #[arg(
        help_heading = "Basics",
        long,
        short = 'o',
        env = "THRU_OUT",
        default_value = ".",
        value_name = "DIR"
    )]
    pub out: PathBuf,

    /// Accept the offered files without asking.
    #[arg(help_heading = "Basics", long, short = 'y', env = "THRU_YES")]
    pub yes: bool,

    /// What to do with a file that exists here with other content: ask (in the prompt),
    /// skip it (keep yours), save the new one as `name (1).ext` beside yours, or overwrite
    /// it.
    #[arg(help_heading = "Basics", long, env = "THRU_ON_CONFLICT", value_enum, default_value_t = OnConflict::Ask,
          value_name = "WHAT")]
    pub on_conflict: OnConflict,

    /// Replace existing files: the same as --on-conflict overwrite.
    #[arg(help_heading = "Basics", long, env = "THRU_FORCE")]
    pub force: bool,

    /// Give received files and new directories the sender's permission bits as sent,
    /// including group- and world-writable ones, ignoring your umask. Without it your umask
    /// applies and nothing is made group- or world-writable. Setuid, setgid and sticky bits
    /// are never set, and directories that already exist are never changed.
    #[arg(help_heading = "Basics", long, env = "THRU_KEEP_MODES")]
    pub keep_modes: bool,
    /// Send every byte: never skip a file already here or resume a partial one. Skipping tells
    /// the sender whether you hold an identical file; with this flag an existing file is a
    /// conflict (see --on-conflict).
    #[arg(help_heading = "Basics", long, env = "THRU_NO_SKIP_IDENTICAL")]
    pub no_skip_identical: bool,

    /// Print the whole offer (a tree with sizes, links and counts) and exit 0, receiving
    /// nothing: the host keeps serving and the code stays valid (no --yes needed).
    #[arg(help_heading = "Choosing", long, env = "THRU_LIST",
          conflicts_with_all = ["include", "exclude", "select"])]
    pub list: bool,

    /// Receive only entries matching GLOB (repeatable). A glob matches an entry's path or
    /// any directory above it, and `*` crosses `/`: `--include photos` takes the tree,
    /// `--include '*.pdf'` every PDF. The host sends nothing else; the summary says how many
    /// files were left out. Run again with more patterns to add files: those already here
    /// are skipped.
    #[arg(help_heading = "Choosing", long, value_name = "GLOB")]
    pub include: Vec<String>,

    /// Leave out entries matching GLOB (repeatable; as --include, and it wins over it).
    #[arg(help_heading = "Choosing", long, value_name = "GLOB")]
    pub exclude: Vec<String>,

    /// On a terminal, choose the files in an interactive picker (checkboxes and search),
    /// starting from what --include/--exclude chose.
    #[arg(help_heading = "Choosing", long)]
    pub select: bool,

    /// Sync every received file and directory to stable storage before reporting done, so
    /// that a finished transfer survives a power loss; the summary says how long it took.
    #[arg(help_heading = "Basics", long, env = "THRU_DURABLE")]
    pub durable: bool,

    /// Receive one upload through the server's web relay (thruserv --web-relay): prints a
    /// single-use link whose page encrypts in the browser. Needs --server; takes no CODE.
    #[arg(help_heading = "Web", long, env = "THRU_WEB", conflicts_with = "code")]
    pub web: bool,

    /// With --web: accept an unencrypted upload from curl (`curl -T FILE URL`); the server
    /// sees the name and contents.
    #[arg(help_heading = "Web", long, env = "THRU_PLAIN", requires = "web")]
    pub plain: bool,

    /// With --web: also print the link as a QR code, for a phone.
    #[arg(help_heading = "Web", long, env = "THRU_QR", requires = "web")]
    pub qr: bool,

    /// LAN: the host's pairing address (IP or IP:PORT, as the host prints), skipping mDNS.
    #[arg(help_heading = "Network", long, env = "THRU_PEER", value_parser = parse_peer, value_name = "ADDR")]
    pub peer: Option<SocketAddr>,

    /// Shared network and engine flags.
    #[command(flatten)]
    pub net: NetArgs,
}

/// `--compress`: when the host compresses file data.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, clap::ValueEnum)]
pub enum CompressChoice {
    /// Where a sample of each file shows it pays.
    #[default]
    Auto,
    /// Every chunk that gets smaller.
    On,
    /// Never.
    Off,
}

/// `--on-conflict`: what happens to a file that is already at the destination with other
/// content.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// Ask in the prompt, for all such files or for each (without a terminal: refuse, exit 5).
    #[default]
    Ask,
    /// Keep the file here; the offered one is not kept.
    Skip,
    /// Rename the file here to `name (1).ext` and receive the offered one under its name.
    Rename,
    /// Replace the file here.
    Overwrite,
}

impl JoinArgs {
    /// The conflict policy, `--force` included.
    pub fn conflict_policy(&self) -> OnConflict {
        if self.force {
            OnConflict::Overwrite
        } else {
            self.on_conflict
        }
    }
}

/// The public STUN servers asked when `--stun-server` is not given.
pub const DEFAULT_STUN_SERVERS: &str = "stun:stun.l.google.com:19302,stun:stun.cloudflare.com:3478";

/// [`DEFAULT_STUN_SERVERS`] as the list `--stun-server` parses into.
pub fn default_stun_servers() -> Vec<String> {
    DEFAULT_STUN_SERVERS
        .split(',')
        .map(str::to_string)
        .collect()
}

/// Flags both sides take.
#[derive(Debug, Args)]
pub struct NetArgs {
    /// Signaling server URL (ws://, wss://, http://, https://). Without it: LAN mode.
    #[arg(
        help_heading = "Network",
        long,
        visible_alias = "server-url",
        env = "THRU_SERVER_URL",
        value_name = "URL"
    )]
    pub server: Option<String>,

    /// STUN servers, comma-separated (used with --server).
    #[arg(help_heading = "Network", 
        long,
        env = "THRU_STUN_SERVERS",
        value_delimiter = ',',
        value_name = "URLS",
        default_value = DEFAULT_STUN_SERVERS
    )]
    pub stun_server: Vec<String>,

    /// TURN servers, comma-separated: `turn:USER:PASS@HOST[:PORT][?transport=tcp]`, or
    /// `turns:USER:PASS@HOST:443` for TLS (networks that block UDP). Default none. Values
    /// here show in `ps`; prefer --turn-server-file for passwords.
    #[arg(
        help_heading = "Network",
        long,
        env = "THRU_TURN_SERVERS",
        hide_env_values = true,
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub turn_server: Vec<String>,

    /// File of TURN servers, one URL per line (as --turn-server; `#` comments and blank
    /// lines skipped), added to --turn-server: keeps the passwords out of argv.
    #[arg(
        help_heading = "Network",
        long,
        env = "THRU_TURN_SERVER_FILE",
        value_name = "PATH"
    )]
    pub turn_server_file: Option<PathBuf>,

    /// Certificate (PEM or DER) a turns: server must present, for a self-hosted TURN server
    /// with a self-signed certificate. Without it the Web PKI roots are used.
    #[arg(
        help_heading = "Network",
        long,
        env = "THRU_TURN_CERT",
        value_name = "FILE"
    )]
    pub turn_cert: Option<PathBuf>,

    /// Largest QUIC connection receive window (starts at 8 MiB, grows with the path's
    /// measured bandwidth-delay product).
    #[arg(help_heading = "Tuning", long, env = "THRU_QUIC_CONN_WINDOW_BYTES", default_value = "1GiB",
          value_parser = parse_size, value_name = "SIZE")]
    pub quic_conn_window_bytes: u64,

    /// QUIC per-stream receive window.
    #[arg(help_heading = "Tuning", long, env = "THRU_QUIC_STREAM_WINDOW_BYTES", default_value = "32MiB",
          value_parser = parse_size, value_name = "SIZE")]
    pub quic_stream_window_bytes: u64,

    /// Most QUIC streams the peer may open at once.
    #[arg(help_heading = "Tuning", long, env = "THRU_QUIC_MAX_INCOMING_STREAMS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub quic_max_incoming_streams: u32,

    /// Disk and socket I/O driver.
    #[arg(help_heading = "Tuning", long, env = "THRU_IO_DRIVER", value_enum, default_value_t = IoDriver::Auto)]
    pub io_driver: IoDriver,

    /// QUIC stack: quinn (quinn-proto) or s2n (s2n-quic). Both sides run the same one: a
    /// joiner's `auto` takes the host's, and a joiner that names another stack is refused at
    /// pairing with both names. A host's `auto` runs quinn.
    #[arg(help_heading = "Tuning", long, env = "THRU_QUIC", value_enum, default_value_t = QuicChoice::Auto)]
    pub quic: QuicChoice,

    /// Page cache or O_DIRECT for file data. `auto` measures per transfer: reads go buffered
    /// when the page cache holds the file, writes when the transfer fits in what the page
    /// cache may still hold dirty; O_DIRECT otherwise. `-v` says what it picked and why.
    #[arg(help_heading = "Tuning", long, env = "THRU_DISK", value_enum, default_value_t = DiskChoice::Auto)]
    pub disk: DiskChoice,

    /// Worker threads for the data path (default: one per core).
    #[arg(help_heading = "Tuning", long, env = "THRU_CORES", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub cores: Option<u16>,

    /// Local UDP port for QUIC (0: any). A LAN host also listens for pairing on TCP 47115,
    /// or any free port.
    #[arg(help_heading = "Network", long, env = "THRU_PORT", default_value_t = 0)]
    pub port: u16,

    /// LAN: do not use mDNS (joiners then need --peer).
    #[arg(help_heading = "Network", long, env = "THRU_NO_MDNS")]
    pub no_mdns: bool,

    /// LAN: use mDNS only on this interface (repeatable; default all).
    #[arg(
        help_heading = "Network",
        long,
        env = "THRU_MDNS_INTERFACE",
        value_name = "NAME"
    )]
    pub mdns_interface: Vec<String>,

    /// Limit for pairing with a peer.
    #[arg(help_heading = "Network", long, env = "THRU_PAIR_TIMEOUT", default_value = "30s",
          value_parser = parse_duration, value_name = "DURATION")]
    pub pair_timeout: Duration,

    /// A name for this process in its log lines (default: none).
    #[arg(help_heading = "Output", long, env = "THRU_PEER_ID", value_name = "ID")]
    pub peer_id: Option<String>,

    /// Print throughput, time to first byte, peak rate, RTT, loss, CPU time and the route.
    #[arg(help_heading = "Output", long, env = "THRU_BENCHMARK")]
    pub benchmark: bool,
}

impl NetArgs {
    /// `--turn-server` followed by the entries of `--turn-server-file`. The error names the
    /// file, never its contents (they hold passwords).
    pub fn turn_servers(&self) -> Result<Vec<String>, String> {
        let mut out = self.turn_server.clone();
        if let Some(path) = &self.turn_server_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!("--turn-server-file {}: cannot read it: {e}", path.display())
            })?;
            out.extend(turn_server_lines(&text));
        }
        Ok(out)
    }
}

/// The TURN URLs in a `--turn-server-file`: one per line, trimmed; blank lines and lines
/// starting with `#` skipped.
pub fn turn_server_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// The clap command (for completions, man page and tests).
pub fn command() -> clap::Command {
    Cli::command()
}

/// The man pages, as (file name, roff): `thru.1`, then `thru-COMMAND.1` for every
/// subcommand the first one lists (clap's `help` included), so each page it refers to exists.
pub fn man_pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut cmd = command();
    cmd.build();
    let mut pages = Vec::new();
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    pages.push(("thru.1".to_string(), out));
    for sub in cmd.get_subcommands() {
        let name = format!("thru-{}", sub.get_name());
        let sub = sub
            .clone()
            .display_name(name.clone())
            .bin_name(format!("thru {}", sub.get_name()));
        let mut out = Vec::new();
        clap_mangen::Man::new(sub).render(&mut out)?;
        pages.push((format!("{name}.1"), out));
    }
    Ok(pages)
}

/// Every man page, one after the other (`thru man` without a directory).
pub fn man_page() -> std::io::Result<Vec<u8>> {
    Ok(man_pages()?.into_iter().flat_map(|(_, p)| p).collect())
}

/// Writes the completion script for `shell`.
pub fn completions(shell: Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut command(), "thru", out);
}

/// Parses a byte size: a number with an optional unit `K`, `M`, `G`, `T` (powers of 1024,
/// also written `KiB`…, `KB`…), case-insensitive (the parse-size crate, binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| match e {
            parse_size::Error::PosOverflow => format!("size {s:?} is too large"),
            _ => format!("{s:?} is not a size (a number with K, M, G or T, powers of 1024; examples: 4096, 256KiB, 32MiB, 1GiB)"),
        })
}

fn parse_chunk_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if !(256 << 10..=4 << 20).contains(&n) {
        return Err(format!(
            "chunk size must be between 256KiB and 4MiB, got {s}"
        ));
    }
    if n % 4096 != 0 {
        return Err(format!("chunk size must be a multiple of 4KiB, got {s}"));
    }
    Ok(n)
}

/// Parses `--peer`: `IP:PORT`, `[V6]:PORT`, or a bare IP (the default LAN pairing port).
pub fn parse_peer(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = t.trim_start_matches('[').trim_end_matches(']').parse() {
        return Ok(SocketAddr::new(ip, crate::rendezvous::DEFAULT_LAN_PORT));
    }
    Err(format!(
        "{s:?} is not an address: use IP or IP:PORT, e.g. 192.168.1.20 or 192.168.1.20:47115"
    ))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 500ms, 30s, 2m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_is_consistent() {
        command().debug_assert();
        // `--help` and the man page show the same table.
        assert!(AFTER_HELP.ends_with(EXIT_CODES));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        // Fractions, spaces and the conventional units, all in powers of 1024 (parse-size).
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("1 KB"), Ok(1024));
        assert!(parse_size("12parsecs").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_chunk_size("1MiB"), Ok(1 << 20));
        assert!(parse_chunk_size("100KiB").unwrap_err().contains("256KiB"));
        assert!(parse_chunk_size("8MiB").is_err());
        assert!(parse_chunk_size("262145").is_err());
    }

    #[test]
    fn peers() {
        assert_eq!(
            parse_peer("10.0.0.2:9000"),
            Ok("10.0.0.2:9000".parse().unwrap())
        );
        assert_eq!(parse_peer("10.0.0.2").unwrap().port(), 47115);
        assert_eq!(parse_peer("[::1]").unwrap().port(), 47115);
        assert!(parse_peer("host.example").unwrap_err().contains("IP:PORT"));
    }

    #[test]
    fn join_parses_with_defaults() {
        let cli = Cli::try_parse_from(["thru", "join", "K7QF2M-XD4P-RT9A", "--yes"]).unwrap();
        let Command::Join(j) = cli.command else {
            panic!("join")
        };
        assert_eq!(j.code.as_deref(), Some("K7QF2M-XD4P-RT9A"));
        assert!(j.yes);
        assert_eq!(j.net.quic_conn_window_bytes, 1 << 30);
        assert_eq!(j.net.stun_server.len(), 2);
    }

    #[test]
    fn turn_server_file_lines() {
        let text = "# relay\n turn:u:p@relay.example:3478 \n\nturns:u:p@relay.example:443\r\n";
        assert_eq!(
            turn_server_lines(text),
            ["turn:u:p@relay.example:3478", "turns:u:p@relay.example:443"]
        );
    }

    #[test]
    fn usage_errors_name_the_flag() {
        let e = Cli::try_parse_from(["thru", "host", "x", "--parallel-files", "9"]).unwrap_err();
        assert!(e.to_string().contains("--parallel-files"), "{e}");
        let e = Cli::try_parse_from(["thru", "host"]).unwrap_err();
        assert!(e.to_string().contains("PATH"), "{e}");
        let e = Cli::try_parse_from(["thru", "host", "x", "--text", "hi"]).unwrap_err();
        assert!(e.to_string().contains("--text"), "{e}");
        let e = Cli::try_parse_from(["thru", "host", "x", "--compress", "max"]).unwrap_err();
        assert!(e.to_string().contains("--compress"), "{e}");
        let e = Cli::try_parse_from(["thru", "join", "--io-driver", "magic"]).unwrap_err();
        assert!(e.to_string().contains("--io-driver"), "{e}");
    }
}
