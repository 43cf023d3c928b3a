//! `thru`: the Thruflux command-line tool.
//!
//! A thin binary: parse flags ([`thru::cli`]), install logging, then for `host`/`join`:
//! bind the QUIC UDP socket, make a throwaway identity, pair (through `thruserv` with
//! `--server`, otherwise on the LAN), print the code and the verified peer; a host serves every
//! paired joiner through one [`thru::transfer::HostEngine`], a joiner receives with
//! [`thru::transfer::run_transfer`]. `completions` and `man` print generated
//! text. Exit codes are [`thru::cli::Exit`].

use std::io::{IsTerminal as _, Write as _};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::FromArgMatches as _;
use flux_quic::{Identity, TransportParams};
use flux_signal::client::ClientConfig;
use thru::cli::{self, Cli, Command, Exit, HostArgs, JoinArgs, NetArgs};
use thru::code::JoinCode;
use thru::pake::LocalInfo;
use thru::rendezvous::{
    self, HostEvent, HostOptions, JoinOptions, LanHostConfig, LanTarget, Mdns, PairError,
};
use thru::transfer::{
    HostEngine, HostNote, IceServers, Job, TransferError, TransferJob, Tuning, resolve_ice_servers,
    run_transfer,
};
use thru::ui::Ui;
use tracing::Instrument as _;

fn main() -> ExitCode {
    // rustls picks a process-wide crypto provider for code that does not name one (the Redis
    // client's `rediss://`, for one). A build that also links aws-lc (s2n-quic does) leaves two
    // candidates and such code panics: name *ring*, the provider every other connection uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let parsed = cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|c| (c, m)));
    let (mut cli, matches) = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                Exit::Usage.code()
            } else {
                Exit::Ok.code()
            });
        }
    };
    let config_path = thru::config::path();
    let config = match config_path.as_deref().map(thru::config::load).transpose() {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => {
            Ui::new(cli.json, cli.quiet).error(&e.to_string(), None, Exit::Usage.code());
            return ExitCode::from(Exit::Usage.code());
        }
    };
    thru::config::apply(&mut cli, &matches, &config);
    if matches!(cli.command, Command::Config) {
        let text = thru::config::describe(config_path.as_deref(), &config, &|v| {
            std::env::var(v).ok().filter(|s| !s.is_empty())
        });
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    init_logging(cli.verbose, cli.quiet);
    let ui = Ui::new(cli.json, cli.quiet);
    let server = match &cli.command {
        Command::Host(a) => a.net.server.clone(),
        Command::Join(a) => a.net.server.clone(),
        _ => None,
    };
    // A joiner looking for its host by mDNS.
    let by_mdns =
        matches!(&cli.command, Command::Join(a) if a.net.server.is_none() && a.peer.is_none());
    match run(cli, &ui) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let exit = classify(&err);
            let hint = hint(&err, server.as_deref(), by_mdns);
            ui.error(&message(&err), hint.as_deref(), exit.code());
            ExitCode::from(exit.code())
        }
    }
}

/// The error chain on one line, each cause once: some errors print their source in their
/// own text as well (`signaling server: cannot connect to X` over `cannot connect to X`), and
/// the plain `{:#}` chain would say it twice.
fn message(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// What to try, for the errors with a likely cause.
fn hint(err: &anyhow::Error, server: Option<&str>, by_mdns: bool) -> Option<String> {
    use flux_signal::client::ClientError;
    use flux_signal_proto::ErrorCode;
    let rate = |code: &ErrorCode| match code {
        // thruserv's per-IP budgets are per minute (it sends `Retry-After: 60`); the message
        // budget is per second.
        ErrorCode::ConnectRateLimited
        | ErrorCode::CreateRateLimited
        | ErrorCode::PairingRateLimited => {
            Some("the server is rate limiting this address; retry in 60 s".to_string())
        }
        ErrorCode::RateLimited => {
            Some("the server is rate limiting this connection; retry in 1 s".to_string())
        }
        _ => None,
    };
    for cause in err.chain() {
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            match c {
                ClientError::Connect { .. } => {
                    return Some(format!(
                        "is thruserv running at {}? is the URL right?",
                        server.unwrap_or("the --server URL")
                    ));
                }
                ClientError::Refused { status: 429, .. } => {
                    return Some("the server is rate limiting this address; retry in 60 s".into());
                }
                ClientError::Refused { code, .. } | ClientError::Server { code, .. } => {
                    if let Some(h) = rate(code) {
                        return Some(h);
                    }
                }
                _ => {}
            }
        }
        if let Some(PairError::NotFound(_) | PairError::Timeout { .. }) =
            cause.downcast_ref::<PairError>()
            && by_mdns
        {
            return Some(
                "did the host use --server? (then pass the same --server) is multicast blocked \
                 here? try --peer ADDR, as the host prints it"
                    .into(),
            );
        }
    }
    None
}

fn run(cli: Cli, ui: &Ui) -> anyhow::Result<()> {
    match cli.command {
        Command::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            thru::cli::completions(shell, &mut out);
            let _ = out.flush();
            Ok(())
        }
        Command::Man { dir: None } => {
            let page = thru::cli::man_page().context("rendering the man page")?;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&page);
            let _ = out.flush();
            Ok(())
        }
        Command::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| UsageError(format!("{}: {e}", dir.display())))?;
            for (name, page) in thru::cli::man_pages().context("rendering the man pages")? {
                let path = dir.join(name);
                std::fs::write(&path, page)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("{}", path.display());
            }
            Ok(())
        }
        // Answered before logging starts, in main.
        Command::Config => Ok(()),
        Command::Host(args) => {
            ui.banner(env!("CARGO_PKG_VERSION"));
            ui.start(thru::pairing::Role::Host);
            let span = span(args.net.peer_id.as_deref());
            runtime()?.block_on(host(args, ui).instrument(span))
        }
        Command::Join(args) => {
            ui.banner(env!("CARGO_PKG_VERSION"));
            ui.start(thru::pairing::Role::Joiner);
            let span = span(args.net.peer_id.as_deref());
            runtime()?.block_on(join(args, ui).instrument(span))
        }
    }
}

/// The user pressed Ctrl-C (exit 130, as for a process killed by SIGINT).
#[derive(Debug, thiserror::Error)]
#[error("stopped (Ctrl-C)")]
struct Interrupted;

/// A usage problem found after parsing (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// `--server` must name its scheme: `127.0.0.1:8080` could mean ws:// or wss://, and
/// guessing wrong would send pairing in clear or fail obscurely.
fn check_server_url(net: &NetArgs) -> Result<(), UsageError> {
    let Some(url) = &net.server else {
        return Ok(());
    };
    let lower = url.to_ascii_lowercase();
    let ok = ["ws://", "wss://", "http://", "https://"]
        .iter()
        .any(|s| lower.starts_with(s) && lower.len() > s.len());
    if ok {
        Ok(())
    } else {
        Err(UsageError(format!(
            "--server {url:?}: give a URL with its scheme, e.g. ws://{0} or wss://{0}",
            url.split_once("://").map_or(url.as_str(), |(_, r)| r)
        )))
    }
}

/// The text of `--text`: the argument, or stdin for `-`; over the limit or not UTF-8 is a
/// usage error.
fn read_text(arg: &str) -> Result<String, UsageError> {
    use std::io::Read as _;
    let limit = flux_wire::MAX_MESSAGE_BYTES;
    let text = if arg == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .lock()
            .take(limit as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| UsageError(format!("--text -: reading stdin: {e}")))?;
        if buf.len() > limit {
            return Err(UsageError(format!(
                "--text -: stdin holds more than {limit} bytes (64 KiB), the limit for a text; \
                 send it as a file instead (thru host -)"
            )));
        }
        String::from_utf8(buf).map_err(|_| {
            UsageError("--text -: stdin is not UTF-8 text; send it as a file".into())
        })?
    } else {
        arg.to_owned()
    };
    if text.len() > limit {
        return Err(UsageError(format!(
            "--text: the text is {} bytes; the limit is {limit} bytes (64 KiB): send it as a \
             file instead",
            text.len()
        )));
    }
    Ok(text)
}

async fn host(args: HostArgs, ui: &Ui) -> anyhow::Result<()> {
    check_server_url(&args.net)?;
    let text = args.text.as_deref().map(read_text).transpose()?;
    let stream = stream_name(&args)?;
    if stream.is_none() {
        for p in &args.paths {
            std::fs::symlink_metadata(p)
                .map_err(|e| UsageError(format!("cannot read {}: {e}", p.display())))?;
        }
    }
    if args.web {
        if stream.is_some() {
            return Err(UsageError(
                "--web cannot send stdin (`-`): the relay serves files it can read again; \
                 save the stream to a file first"
                    .into(),
            )
            .into());
        }
        return web_host(args, ui).await;
    }
    let is_stream = stream.is_some();
    let setup = Setup::new(&args.net).await?;
    // The host's stack, named in its pairing reply (a joiner's `auto` takes it).
    let mut opts = HostOptions::new(LocalInfo {
        quic: Some(args.net.quic.host()),
        ..setup.local.clone()
    });
    opts.max_receivers = args.max_receivers;
    opts.handshake_timeout = args.net.pair_timeout;
    opts.allow_loopback = setup.allow_loopback;
    // A joiner that only lists (`thru join --list`) gives its slot back.
    opts.reusable_slots = true;
    let mut session = match &args.net.server {
        Some(url) => rendezvous::host_server(url, &client_config(url)?, opts)
            .await
            .context("pairing failed")?,
        None => {
            let cfg = LanHostConfig {
                bind: SocketAddr::from(([0, 0, 0, 0], 0)),
                mdns: mdns(&args.net),
            };
            rendezvous::host_lan(cfg, opts)
                .await
                .context("pairing failed")?
        }
    };
    let hint = session.lan_addr().map(|a| {
        let ip = setup
            .local
            .addrs
            .first()
            .map_or(IpAddr::from([127, 0, 0, 1]), |s| s.ip());
        SocketAddr::new(ip, a.port()).to_string()
    });
    let text_len = text.as_ref().map(|t| t.len() as u64);
    let mut job = setup.job(
        Job::Send {
            paths: args.paths.clone(),
            text,
            stream,
        },
        &args.net,
        args.chunk_size,
        Some(args.parallel_files),
    );
    job.tuning.compress = match args.compress {
        cli::CompressChoice::Auto => flux_transfer::Compress::Auto,
        cli::CompressChoice::On => flux_transfer::Compress::On,
        cli::CompressChoice::Off => flux_transfer::Compress::Off,
    };
    let (notes_tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    let engine = HostEngine::start(&job, args.max_receivers as usize, ui, notes_tx)?;
    match text_len {
        Some(n) => ui.offering_text(n),
        None if is_stream => {
            ui.offering_stream(&args.name.clone().unwrap_or_else(|| "stdin".into()));
        }
        None => {
            let (files, bytes) = engine.offered();
            ui.offering(files, bytes);
        }
    }
    ui.code(session.code(), args.words, args.net.server.as_deref(), hint);
    let max = u64::from(args.max_receivers);
    ui.waiting(0, max);
    let (mut paired, mut finished) = (0usize, 0usize);
    let (mut served, mut failed, mut sent) = (0u64, 0u64, 0u64);
    let mut first_pairing: Option<std::time::Instant> = None;
    let mut last_failure: Option<TransferError> = None;
    let mut ended = false;
    // Joiners that paired but have not connected yet, with when they paired: one that never
    // connects (killed, unreachable, ICE failed) must not keep the host waiting forever.
    let mut waiting: std::collections::HashMap<[u8; 32], (String, std::time::Instant)> =
        std::collections::HashMap::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the Ctrl-C handler")?;
    loop {
        let before = finished;
        tokio::select! {
            _ = sigint.recv() => {
                // Cancelling closes every connection: receivers learn at once and why, and can
                // resume later, instead of waiting out QUIC's idle timeout.
                engine.cancel_with("the host stopped (Ctrl-C)");
                drop(engine);
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                return Err(Interrupted.into());
            }
            ev = session.next_event(), if !ended => match ev {
                Some(HostEvent::Paired(p, trickle)) => {
                    paired += 1;
                    first_pairing.get_or_insert_with(std::time::Instant::now);
                    ui.peer(&p);
                    ui.receiver(&p.peer_label, thru::ui::ReceiverState::Waiting, None);
                    // With a server, the engine runs ICE with the joiner over its trickle.
                    engine.admit(&p, trickle);
                    waiting.insert(
                        p.peer_fingerprint,
                        (p.peer_label.clone(), std::time::Instant::now()),
                    );
                }
                Some(HostEvent::Failed { peer, error }) => {
                    ui.pairing_failed(&peer, &error.to_string());
                }
                Some(HostEvent::Ended { error: Some(e) }) if paired == 0 => {
                    drop(engine);
                    return Err(anyhow::Error::new(e).context("pairing failed"));
                }
                Some(HostEvent::Ended { error }) => {
                    if let Some(e) = error {
                        ui.say(&format!("No more receivers: {e}"));
                    }
                    ended = true;
                }
                Some(_) => {}
                None => ended = true,
            },
            Some(note) = notes.recv() => match note {
                HostNote::Connected { fingerprint } => {
                    waiting.remove(&fingerprint);
                }
                HostNote::Browsed { .. } => {
                    // Not a receiver: its slot goes back, and the code stays good.
                    paired = paired.saturating_sub(1);
                    session.release();
                }
                HostNote::Ended { peer, result } => {
                    finished += 1;
                    match *result {
                        Ok(summary) => {
                            served += 1;
                            sent += summary.sent_bytes;
                        }
                        Err(TransferError::Declined(reason)) => {
                            failed += 1;
                            ui.declined(&peer, &reason, max > 1);
                            last_failure = Some(TransferError::Declined(reason));
                        }
                        Err(e) => {
                            // The engine said so already (`joiner 1: gone (…)`).
                            let _ = peer;
                            failed += 1;
                            last_failure = Some(e);
                        }
                    }
                }
            },
            _ = tick.tick() => {
                let limit = args.net.pair_timeout;
                let late: Vec<[u8; 32]> = waiting
                    .iter()
                    .filter(|(_, (_, at))| at.elapsed() > limit)
                    .map(|(fp, _)| *fp)
                    .collect();
                for fp in late {
                    if let Some((peer, _)) = waiting.remove(&fp) {
                        finished += 1;
                        failed += 1;
                        let e = format!("{peer} paired but never connected over QUIC");
                        ui.receiver(&peer, thru::ui::ReceiverState::Gone, Some(&e));
                        last_failure = Some(TransferError::Failed(e));
                    }
                }
            }
            else => break,
        }
        if (ended && finished >= paired) || finished as u64 >= max {
            break;
        }
        if finished > before && !ended && (finished as u64) < max {
            ui.waiting(finished as u64, max);
        }
    }
    engine.stop()?;
    if paired > 0 {
        ui.emit(&thru::ui::Event::HostSummary {
            receivers_done: served,
            receivers_failed: failed,
            sent_bytes: sent,
            seconds: first_pairing.map_or(0.0, |t| t.elapsed().as_secs_f64()),
        });
    }
    if let Some(e) = last_failure {
        if is_stream && !matches!(e, TransferError::Declined(_)) {
            return Err(anyhow::Error::new(e).context(
                "the stream was interrupted, and a stream cannot be resumed: run the command \
                 that pipes into `thru host -` again",
            ));
        }
        return Err(e.into());
    }
    Ok(())
}

/// `thru host -`: the name stdin is sent under, or `None` when files are sent. `-` must be
/// the only path, goes to one receiver, and `--name` needs it; the name is one safe path
/// component.
fn stream_name(args: &HostArgs) -> Result<Option<String>, UsageError> {
    let dash = args.paths.iter().any(|p| p.as_os_str() == "-");
    if !dash {
        return match &args.name {
            Some(_) => Err(UsageError(
                "--name names the stream of `thru host -`; files keep their own names".into(),
            )),
            None => Ok(None),
        };
    }
    if args.paths.len() > 1 {
        return Err(UsageError(
            "`-` (stdin) must be the only path: a stream is sent alone".into(),
        ));
    }
    if args.max_receivers > 1 {
        return Err(UsageError(format!(
            "--max-receivers {}: stdin (`-`) is read once, so it goes to one receiver",
            args.max_receivers
        )));
    }
    let name = args.name.clone().unwrap_or_else(|| "stdin".to_owned());
    match flux_transfer::path::validate(&name) {
        Ok(parts) if parts.len() == 1 => Ok(Some(name)),
        Ok(_) => Err(UsageError(format!(
            "--name {name:?}: a file name is needed, not a path"
        ))),
        Err(e) => Err(UsageError(format!("--name {name:?}: {e}"))),
    }
}

/// `thru host --web`: a relay link instead of a join code.
async fn web_host(args: HostArgs, ui: &Ui) -> anyhow::Result<()> {
    let Some(server) = args.net.server.clone() else {
        return Err(UsageError(
            "--web shares through a thruserv web relay: give its URL with --server".into(),
        )
        .into());
    };
    let files = thru::web::collect(&args.paths).map_err(|e| UsageError(format!("{e:#}")))?;
    let bytes = files.iter().map(|f| f.size).sum();
    ui.offering(files.len() as u64, bytes);
    let key = if args.plain {
        ui.warn(
            "--plain: not encrypted; the relay server can read every name and byte it \
             carries (leave out --plain to encrypt in the browser)",
        );
        None
    } else {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).context("no randomness for the link key")?;
        Some(k)
    };
    let config = client_config(&server)?;
    let (link, control) = thru::web::open_host(&server, &config, &files, key.as_ref())
        .await
        .context("opening the web link failed")?;
    ui.web_link(&link.url, &link.curl);
    if args.qr
        && let Some(code) = thru::web::qr(&link.url)
    {
        eprintln!("{code}");
    }
    ui.say("Serving downloads through the relay — Ctrl-C to stop");
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the Ctrl-C handler")?;
    tokio::select! {
        r = thru::web::serve(control, server, config, files, key) => {
            let why = r?;
            ui.say(&format!("The relay ended the link: {why}"));
            Ok(())
        }
        _ = sigint.recv() => Err(Interrupted.into()),
    }
}

async fn join(args: JoinArgs, ui: &Ui) -> anyhow::Result<()> {
    // Everything that can be checked here is checked before any network step, so that a
    // problem never uses up the code.
    check_server_url(&args.net)?;
    let terminal = std::io::stdin().is_terminal();
    // Ctrl-C from here on: put the terminal back (the code is read without echo), tell the
    // host at once rather than leave it to time out, and remove a --out made for nothing.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the Ctrl-C handler")?;
    let tty = terminal
        .then(|| rustix::termios::tcgetattr(std::io::stdin()).ok())
        .flatten();
    let stopper = thru::transfer::Stopper::default();
    let created: Arc<std::sync::Mutex<Option<PathBuf>>> = Arc::default();
    let work = join_checked(args, ui, stopper.clone(), created.clone());
    tokio::select! {
        r = work => r,
        _ = sigint.recv() => {
            if let Some(t) = &tty {
                let _ = rustix::termios::tcsetattr(
                    std::io::stdin(),
                    rustix::termios::OptionalActions::Now,
                    t,
                );
            }
            stopper.stop();
            // Long enough for the engine to send the refusal or the close.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            if let Some(top) = created.lock().ok().and_then(|g| g.clone()) {
                remove_empty_dirs(&top);
            }
            ui.error("stopped (Ctrl-C)", None, Exit::Interrupted.code());
            // Not a return: a blocking read of the prompt would hold the runtime's shutdown.
            std::process::exit(i32::from(Exit::Interrupted.code()));
        }
    }
}

/// `join` after its flag checks: the code, `--out`, pairing and the transfer.
async fn join_checked(
    args: JoinArgs,
    ui: &Ui,
    stopper: thru::transfer::Stopper,
    created_out: Arc<std::sync::Mutex<Option<PathBuf>>>,
) -> anyhow::Result<()> {
    let json = ui.mode() == thru::ui::Mode::Json;
    let terminal = std::io::stdin().is_terminal();
    if args.web {
        return web_join(args, ui, json, terminal).await;
    }
    let text = match args.code.clone() {
        Some(c) => c,
        None if terminal && !json => tokio::task::spawn_blocking(ask_code)
            .await
            .context("reading the code")??,
        None => {
            return Err(
                UsageError("no join code: give it as an argument or in THRU_CODE".into()).into(),
            );
        }
    };
    let code: JoinCode = text
        .trim()
        .parse()
        .map_err(|e| UsageError(format!("invalid join code: {e}")))?;
    if args.net.server.is_none() && args.peer.is_none() && args.net.no_mdns {
        return Err(UsageError(
            "--no-mdns without --server needs --peer ADDR (the host prints it)".into(),
        )
        .into());
    }
    let choice = thru::choose::Choice::new(&args.include, &args.exclude).map_err(UsageError)?;
    if args.select && (json || !terminal) {
        return Err(UsageError(
            "--select needs a terminal (use --include/--exclude in scripts)".into(),
        )
        .into());
    }
    if !args.list {
        need_answer_or_yes(args.yes, json, terminal)?;
    }
    let to_stdout = stdout_out(&args.out, json)?;
    // --list writes nothing: --out is neither checked nor created; nor is stdout (--out -).
    let created = if args.list || to_stdout {
        None
    } else {
        prepare_out(&args.out)?
    };
    if let Ok(mut g) = created_out.lock() {
        g.clone_from(&created);
    }
    let result = join_paired(args, code, choice, ui, stopper).await;
    if result.is_err()
        && let Some(top) = created
    {
        remove_empty_dirs(&top);
    }
    result
}

/// A joiner that will be asked to accept needs someone to ask: a terminal, and not `--json`;
/// otherwise `--yes`.
fn need_answer_or_yes(yes: bool, json: bool, terminal: bool) -> anyhow::Result<()> {
    if yes || (terminal && !json) {
        return Ok(());
    }
    Err(UsageError(if json {
        "--json: nobody is asked under --json; pass --yes".into()
    } else {
        "no terminal to ask on; pass --yes".into()
    })
    .into())
}

/// Whether `--out` is stdout (`-`); that and `--json` both want stdout.
fn stdout_out(out: &std::path::Path, json: bool) -> anyhow::Result<bool> {
    let to_stdout = thru::transfer::is_stdout(out);
    if to_stdout && json {
        return Err(UsageError(
            "--out - writes the file to stdout, where --json writes its events: use one or the \
             other"
                .into(),
        )
        .into());
    }
    Ok(to_stdout)
}

/// `thru join --web`: one upload through a single-use relay link, under the receiver's rules.
async fn web_join(args: JoinArgs, ui: &Ui, json: bool, terminal: bool) -> anyhow::Result<()> {
    let Some(server) = args.net.server.clone() else {
        return Err(UsageError(
            "--web receives through a thruserv web relay: give its URL with --server".into(),
        )
        .into());
    };
    need_answer_or_yes(args.yes, json, terminal)?;
    let to_stdout = stdout_out(&args.out, json)?;
    let created = if to_stdout {
        None
    } else {
        prepare_out(&args.out)?
    };
    let key = if args.plain {
        ui.warn(
            "--plain: not encrypted; the relay server can read the name and every byte of \
             the upload (leave out --plain to have the browser encrypt it)",
        );
        None
    } else {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).context("no randomness for the link key")?;
        Some(k)
    };
    let config = client_config(&server)?;
    let (link, control) = thru::web::open_receiver(&server, &config, key.as_ref())
        .await
        .context("opening the upload link failed")?;
    ui.web_link(&link.url, &link.curl);
    if args.qr
        && let Some(code) = thru::web::qr(&link.url)
    {
        eprintln!("{code}");
    }
    ui.say("Waiting for the upload (the link works once) — Ctrl-C to stop");
    let mut decide = WebDecide {
        yes: args.yes,
        policy: args.conflict_policy(),
        out: args.out.clone(),
    };
    let result =
        thru::web::receive_one(control, &server, &config, key, &args.out, &mut decide).await;
    match result {
        Ok(files) => {
            let bytes: u64 = files.iter().map(|f| f.1).sum();
            for (path, size) in &files {
                ui.say(&format!("Received {} ({size} bytes)", path.display()));
            }
            ui.say(&format!(
                "Done: {} file(s), {bytes} bytes, verified",
                files.len()
            ));
            Ok(())
        }
        Err(e) => {
            if let Some(top) = created {
                remove_empty_dirs(&top);
            }
            Err(e.context("the upload was not received"))
        }
    }
}

/// The receiver's decisions for a web upload: the prompt and `--on-conflict`.
struct WebDecide {
    yes: bool,
    policy: cli::OnConflict,
    out: PathBuf,
}

fn ask_yes_no(question: &str) -> bool {
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok()
        && matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

impl thru::web::Decide for WebDecide {
    fn offer(&mut self, files: &[thru::web::Announced]) -> Result<(), String> {
        if self.yes {
            return Ok(());
        }
        let bytes: u64 = files.iter().map(|f| f.size).sum();
        eprintln!(
            "The uploader offers {} file(s), {bytes} bytes:",
            files.len()
        );
        for f in files.iter().take(40) {
            eprintln!("  {} ({} bytes)", thru::ui::safe_name(&f.name), f.size);
        }
        if ask_yes_no(&format!("Receive into {}?", self.out.display())) {
            Ok(())
        } else {
            Err("the receiver declined".into())
        }
    }

    fn clash(&mut self, path: &Path) -> Option<PathBuf> {
        match self.policy {
            cli::OnConflict::Overwrite => Some(path.to_path_buf()),
            cli::OnConflict::Rename => (1..)
                .map(|k| thru::transfer::numbered(path, k))
                .find(|p| std::fs::symlink_metadata(p).is_err()),
            cli::OnConflict::Skip => None,
            cli::OnConflict::Ask if self.yes => None,
            cli::OnConflict::Ask => {
                ask_yes_no(&format!("{} exists here. Replace it?", path.display()))
                    .then(|| path.to_path_buf())
            }
        }
    }
}

/// Asks for the join code on the terminal without echoing it (as wormhole does): it is a
/// secret, and the screen may be shared.
fn ask_code() -> anyhow::Result<String> {
    let code = rpassword::prompt_password("Join code (input hidden): ").map_err(|e| {
        if e.kind() == std::io::ErrorKind::Interrupted {
            // Ctrl-C: rpassword has put the echo back.
            anyhow::Error::new(Interrupted)
        } else {
            UsageError(format!("reading the join code: {e}")).into()
        }
    })?;
    if code.trim().is_empty() {
        return Err(UsageError("no join code given".into()).into());
    }
    Ok(code)
}

/// Checks `--out`: a writable directory, created if missing. Returns the topmost directory
/// it created, to remove again if nothing arrives.
fn prepare_out(out: &Path) -> Result<Option<PathBuf>, UsageError> {
    let shown = out.display();
    let created = match std::fs::metadata(out) {
        Ok(m) if !m.is_dir() => {
            return Err(UsageError(format!(
                "--out {shown} is a file; give a directory"
            )));
        }
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut top = out.to_path_buf();
            while let Some(parent) = top.parent() {
                if parent.as_os_str().is_empty() || parent.exists() {
                    break;
                }
                top = parent.to_path_buf();
            }
            std::fs::create_dir_all(out)
                .map_err(|e| UsageError(format!("--out {shown}: cannot create it: {e}")))?;
            Some(top)
        }
        Err(e) => return Err(UsageError(format!("--out {shown}: {e}"))),
    };
    // A probe file, not permission bits: it also catches read-only mounts and ACLs.
    let probe = out.join(format!(".thru-probe-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(created)
        }
        Err(e) => {
            if let Some(top) = &created {
                remove_empty_dirs(top);
            }
            Err(UsageError(format!(
                "--out {shown}: cannot write there: {e}"
            )))
        }
    }
}

/// Removes `top` and the directories under it, as long as they are empty.
fn remove_empty_dirs(top: &Path) {
    fn walk(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path());
                }
            }
        }
        // Fails, as it should, when something is inside.
        let _ = std::fs::remove_dir(dir);
    }
    walk(top);
}

async fn join_paired(
    args: JoinArgs,
    code: JoinCode,
    choice: thru::choose::Choice,
    ui: &Ui,
    stopper: thru::transfer::Stopper,
) -> anyhow::Result<()> {
    let setup = Setup::new(&args.net).await?;
    let mut opts = JoinOptions::new(LocalInfo {
        quic: args.net.quic.stack(),
        ..setup.local.clone()
    });
    opts.timeout = args.net.pair_timeout;
    opts.allow_loopback = setup.allow_loopback || args.peer.is_some_and(|p| p.ip().is_loopback());
    let (paired, trickle) = match (&args.net.server, args.peer) {
        (Some(url), _) => rendezvous::join_server(url, &client_config(url)?, &code, opts)
            .await
            .map(|(p, t)| (p, Some(t))),
        (None, Some(peer)) => rendezvous::join_lan(&code, LanTarget::Peer(peer), opts)
            .await
            .map(|p| (p, None)),
        (None, None) => {
            let m = mdns(&args.net);
            if m == Mdns::Off {
                return Err(UsageError(
                    "--no-mdns without --server needs --peer ADDR (the host prints it)".into(),
                )
                .into());
            }
            rendezvous::join_lan(&code, LanTarget::Mdns(m), opts)
                .await
                .map(|p| (p, None))
        }
    }
    .context("pairing failed")?;
    ui.peer(&paired);
    let mut job = setup.job(
        Job::Receive {
            out: args.out.clone(),
            yes: args.yes,
            on_conflict: args.conflict_policy(),
            keep_modes: args.keep_modes,
            skip_identical: !args.no_skip_identical,
            browse: args.list,
            choice,
            select: args.select,
            durable: args.durable,
        },
        &args.net,
        None,
        None,
    );
    job.stopper = stopper;
    let job = Arc::new(job);
    let ui2 = ui.clone();
    tokio::task::spawn_blocking(move || run_transfer(paired, trickle, &job, &ui2))
        .await
        .context("transfer task")??;
    Ok(())
}

/// What both sides set up before pairing.
struct Setup {
    socket: Arc<UdpSocket>,
    identity: Arc<Identity>,
    local: LocalInfo,
    allow_loopback: bool,
    /// STUN/TURN for ICE, with a signaling server.
    ice: Option<IceServers>,
}

impl Setup {
    async fn new(net: &NetArgs) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], net.port)))
            .with_context(|| format!("cannot bind UDP port {}", net.port))?;
        let port = socket
            .local_addr()
            .context("reading the UDP socket")?
            .port();
        let identity = Identity::generate().context("generating the QUIC identity")?;
        // Loopback addresses are useful only when both ends may be this machine: a LAN
        // session, or a server on loopback (single-machine setups and tests).
        let allow_loopback = match &net.server {
            None => true,
            Some(url) => server_is_loopback(url),
        };
        let local = LocalInfo {
            fingerprint: identity.fingerprint(),
            addrs: rendezvous::local_addrs(port, allow_loopback),
            quic: None,
        };
        // ICE only through a server: on a LAN the host's addresses come authenticated in
        // pairing. With a server on loopback both ends are this machine: no NAT to cross, so
        // the default public STUN servers are not asked (explicit ones still are).
        let ice = match &net.server {
            None => None,
            Some(_) => {
                let defaults = net.stun_server == cli::default_stun_servers();
                let stun: &[String] = if allow_loopback && defaults {
                    &[]
                } else {
                    &net.stun_server
                };
                let turn = net.turn_servers().map_err(UsageError)?;
                let servers =
                    resolve_ice_servers(stun, &turn, net.turn_cert.as_deref(), allow_loopback)
                        .await
                        .map_err(UsageError)?;
                Some(servers)
            }
        };
        Ok(Self {
            socket: Arc::new(socket),
            identity: Arc::new(identity),
            local,
            allow_loopback,
            ice,
        })
    }

    fn job(
        &self,
        job: Job,
        net: &NetArgs,
        chunk_size: Option<u64>,
        parallel_files: Option<u8>,
    ) -> TransferJob {
        let transport = TransportParams {
            conn_window: net.quic_conn_window_bytes,
            stream_window: net.quic_stream_window_bytes,
            max_incoming_streams: net.quic_max_incoming_streams,
            ..TransportParams::default()
        };
        TransferJob {
            job,
            identity: self.identity.clone(),
            socket: self.socket.clone(),
            tuning: Tuning {
                transport,
                chunk_size,
                parallel_files,
                io_driver: net.io_driver,
                quic: net.quic,
                disk: net.disk,
                cores: net.cores,
                benchmark: net.benchmark,
                compress: flux_transfer::Compress::default(),
                ice: self.ice.clone(),
            },
            stopper: thru::transfer::Stopper::default(),
        }
    }
}

fn mdns(net: &NetArgs) -> Mdns {
    if net.no_mdns {
        Mdns::Off
    } else if net.mdns_interface.is_empty() {
        Mdns::AllInterfaces
    } else {
        Mdns::Interfaces(net.mdns_interface.clone())
    }
}

fn client_config(url: &str) -> anyhow::Result<ClientConfig> {
    let mut cfg = ClientConfig::default();
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("wss://") || lower.starts_with("https://") {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg = cfg.tls(Arc::new(tls));
    }
    Ok(cfg)
}

/// Whether the URL's host is a loopback address or `localhost`.
fn server_is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn classify(err: &anyhow::Error) -> Exit {
    for cause in err.chain() {
        if cause.downcast_ref::<UsageError>().is_some()
            || matches!(
                cause.downcast_ref::<flux_signal::client::ClientError>(),
                Some(flux_signal::client::ClientError::InvalidUrl { .. })
            )
        {
            return Exit::Usage;
        }
        if cause.downcast_ref::<Interrupted>().is_some() {
            return Exit::Interrupted;
        }
        if let Some(t) = cause.downcast_ref::<TransferError>() {
            return t.exit();
        }
        if cause.downcast_ref::<PairError>().is_some() {
            return Exit::PairingFailed;
        }
    }
    Exit::TransferFailed
}

/// A log span naming this process (`--peer-id`).
fn span(peer_id: Option<&str>) -> tracing::Span {
    match peer_id {
        Some(id) => tracing::info_span!("thru", peer_id = id),
        None => tracing::Span::none(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info,thru=debug,flux_ice=debug,flux_peer=info",
        (false, _) => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person: a log file or pipe gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
