//! The config file: defaults for the flags people set once, in
//! `$XDG_CONFIG_HOME/thru/config.toml` (`~/.config/thru/config.toml`), or the file named by
//! `THRU_CONFIG`.
//!
//! ```toml
//! server = "wss://relay.example.org"
//! stun_servers = ["stun:stun.example.org:3478"]
//! turn_servers = ["turns:me:secret@turn.example.org:443"]   # credentials: only here
//! out = "~/Downloads/thru"
//! on_conflict = "rename"
//! max_receivers = 1
//! words = true                                              # codes as words
//! ```
//!
//! Precedence, per value: a flag beats its `THRU_*` environment variable, which beats the
//! file, which beats the built-in default. clap settles the first two; [`apply`] fills in the
//! file's value where clap fell back to its default. `thru config` ([`describe`]) prints the
//! effective values and where each came from.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::ArgMatches;
use clap::parser::ValueSource;
use serde::Deserialize;

use crate::cli::{Cli, Command, NetArgs, OnConflict};

/// The environment variable naming another config file.
pub const CONFIG_ENV: &str = "THRU_CONFIG";

/// The settings a config file may hold. Unknown keys are errors: a typo must not be ignored.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `--server`.
    pub server: Option<String>,
    /// `--stun-server`.
    pub stun_servers: Option<Vec<String>>,
    /// `--turn-server`, added to those of `--turn-server`/`--turn-server-file`. Keep
    /// credentials here rather than in argv, where `ps` shows them.
    pub turn_servers: Option<Vec<String>>,
    /// `--turn-cert`.
    pub turn_cert: Option<PathBuf>,
    /// `thru join --out`; a leading `~/` is the home directory.
    pub out: Option<PathBuf>,
    /// `thru join --on-conflict`.
    pub on_conflict: Option<OnConflict>,
    /// `thru host --max-receivers`.
    pub max_receivers: Option<u32>,
    /// `thru host --words`: print codes in the word form.
    pub words: Option<bool>,
}

/// Why the config file could not be used (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("config file {path}: {reason}")]
pub struct ConfigError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

/// Where the config file is looked for.
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(CONFIG_ENV) {
        return Some(PathBuf::from(p));
    }
    use etcetera::BaseStrategy as _;
    let dirs = etcetera::choose_base_strategy().ok()?;
    Some(dirs.config_dir().join("thru").join("config.toml"))
}

/// Reads the config file at `path`; a missing file is an empty config.
pub fn load(path: &Path) -> Result<File, ConfigError> {
    let err = |reason: String| ConfigError {
        path: path.display().to_string(),
        reason,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(File::default()),
        Err(e) => return Err(err(e.to_string())),
    };
    let file: File = toml::from_str(&text).map_err(|e| err(e.message().to_string()))?;
    if let Some(n) = file.max_receivers
        && !(1..=64).contains(&n)
    {
        return Err(err(format!("max_receivers = {n}: must be 1..=64")));
    }
    Ok(file)
}

/// Whether clap took `id` from the command line or the environment (which beat the file).
fn given(m: &ArgMatches, id: &str) -> bool {
    matches!(
        m.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// `~/x` → `$HOME/x`.
fn expand_home(p: &Path) -> PathBuf {
    match (p.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => p.to_path_buf(),
    }
}

/// Fills in the file's values where neither a flag nor the environment set one.
pub fn apply(cli: &mut Cli, matches: &ArgMatches, file: &File) {
    let Some((_, m)) = matches.subcommand() else {
        return;
    };
    match &mut cli.command {
        Command::Host(a) => {
            apply_net(&mut a.net, m, file);
            if let Some(n) = file.max_receivers
                && !given(m, "max_receivers")
            {
                a.max_receivers = n;
            }
            if let Some(w) = file.words
                && !given(m, "words")
            {
                a.words = w;
            }
        }
        Command::Join(a) => {
            apply_net(&mut a.net, m, file);
            if let Some(out) = &file.out
                && !given(m, "out")
            {
                a.out = expand_home(out);
            }
            if let Some(c) = file.on_conflict
                && !given(m, "on_conflict")
            {
                a.on_conflict = c;
            }
        }
        _ => {}
    }
}

fn apply_net(net: &mut NetArgs, m: &ArgMatches, file: &File) {
    if let Some(s) = &file.server
        && !given(m, "server")
    {
        net.server = Some(s.clone());
    }
    if let Some(s) = &file.stun_servers
        && !given(m, "stun_server")
    {
        net.stun_server = s.clone();
    }
    if let Some(t) = &file.turn_servers
        && !given(m, "turn_server")
    {
        net.turn_server = t.clone();
    }
    if let Some(c) = &file.turn_cert
        && !given(m, "turn_cert")
    {
        net.turn_cert = Some(expand_home(c));
    }
}

/// A TURN URL with its password hidden: `turn:me:***@host`.
pub fn redact_turn(url: &str) -> String {
    match url.split_once('@') {
        Some((cred, host)) => match cred.rsplit_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("***@{host}"),
        },
        None => url.to_string(),
    }
}

/// The lines `thru config` prints: each setting, its effective value (as `thru host` and
/// `thru join` would see it without flags) and where it came from.
pub fn describe(path: Option<&Path>, file: &File, env: &dyn Fn(&str) -> Option<String>) -> String {
    let from_file = match path {
        Some(p) => format!("file {}", p.display()),
        None => "file".to_string(),
    };
    // The first of: environment, file, default.
    let pick = |var: &str, file_val: Option<String>, default: &str| match (env(var), file_val) {
        (Some(v), _) => (v, format!("env {var}")),
        (None, Some(v)) => (v, from_file.clone()),
        (None, None) => (default.to_string(), "default".to_string()),
    };
    let turn = |v: String| v.split(',').map(redact_turn).collect::<Vec<_>>().join(",");
    let (turn_value, turn_origin) = pick(
        "THRU_TURN_SERVERS",
        file.turn_servers.as_ref().map(|v| v.join(",")),
        "(none)",
    );
    let rows = [
        (
            "server",
            pick("THRU_SERVER_URL", file.server.clone(), "(none: LAN mode)"),
        ),
        (
            "stun_servers",
            pick(
                "THRU_STUN_SERVERS",
                file.stun_servers.as_ref().map(|v| v.join(",")),
                crate::cli::DEFAULT_STUN_SERVERS,
            ),
        ),
        ("turn_servers", (turn(turn_value), turn_origin)),
        (
            "turn_cert",
            pick(
                "THRU_TURN_CERT",
                file.turn_cert.as_ref().map(|p| p.display().to_string()),
                "(none: Web PKI roots)",
            ),
        ),
        (
            "out",
            pick(
                "THRU_OUT",
                file.out
                    .as_ref()
                    .map(|p| expand_home(p).display().to_string()),
                ".",
            ),
        ),
        (
            "on_conflict",
            pick(
                "THRU_ON_CONFLICT",
                file.on_conflict
                    .map(|c| format!("{c:?}").to_ascii_lowercase()),
                "ask",
            ),
        ),
        (
            "max_receivers",
            pick(
                "THRU_MAX_RECEIVERS",
                file.max_receivers.map(|n| n.to_string()),
                "1",
            ),
        ),
        (
            "words",
            pick("THRU_WORDS", file.words.map(|w| w.to_string()), "false"),
        ),
    ];
    let mut out = match path {
        Some(p) if p.exists() => format!("config file: {}\n", p.display()),
        Some(p) => format!("config file: {} (not found; using defaults)\n", p.display()),
        None => "config file: (no home directory)\n".to_string(),
    };
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, (value, origin)) in rows {
        let _ = writeln!(out, "{key:<width$} = {value}  ({origin})");
    }
    out.push_str("A flag beats its environment variable, which beats the file.\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = std::env::temp_dir().join(format!("thru-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.toml");
        std::fs::write(&p, "sever = \"ws://x\"\n").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("sever"));
        std::fs::write(&p, "max_receivers = 0\n").unwrap();
        assert!(load(&p).is_err());
        std::fs::write(&p, "server = \"ws://x\"\non_conflict = \"rename\"\n").unwrap();
        let f = load(&p).unwrap();
        assert_eq!(f.server.as_deref(), Some("ws://x"));
        assert_eq!(f.on_conflict, Some(OnConflict::Rename));
        assert_eq!(load(&dir.join("none.toml")).unwrap(), File::default());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn turn_passwords_are_hidden() {
        assert_eq!(
            redact_turn("turns:me:s3cret@turn.example.org:443"),
            "turns:me:***@turn.example.org:443"
        );
        let f = File {
            turn_servers: Some(vec!["turn:u:pw@h".into()]),
            ..File::default()
        };
        let text = describe(None, &f, &|_| None);
        assert!(!text.contains("pw@"), "{text}");
    }
}
