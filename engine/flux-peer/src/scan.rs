//! Turning the paths a user shares into a manifest.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flux_transfer::{Manifest, ManifestError, manifest::auto_chunk_size, path};
use flux_wire::{Entry, EntryKind};

use crate::disk::to_timestamp;

/// Why a share could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    /// A path could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A name is not UTF-8 or not portable.
    #[error("{path}: cannot be shared: {reason}")]
    Name {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Two shared paths have the same name at the top level.
    #[error("two shared paths are both named {0:?}")]
    Clash(String),
    /// The manifest was refused.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// A share: its manifest and, for each entry, the file it is read from.
#[derive(Debug)]
pub struct Share {
    /// The manifest.
    pub manifest: Manifest,
    /// Source file of each entry (`None` for directories and links).
    pub sources: Vec<Option<PathBuf>>,
}

/// Builds a share of `paths`. Each path appears under its own name; directories are walked
/// (sorted, so a share is reproducible), symbolic links are sent as links when their target stays
/// inside the share and skipped with a warning otherwise. `chunk_size` of `None` picks one from
/// the largest file.
pub fn scan(paths: &[PathBuf], chunk_size: Option<u32>) -> Result<Share, ScanError> {
    let mut entries = Vec::new();
    let mut sources = Vec::new();
    let mut tops = std::collections::HashSet::new();
    for p in paths {
        let md = fs::symlink_metadata(p).map_err(|source| ScanError::Io {
            path: p.clone(),
            source,
        })?;
        let name = file_name(p)?;
        if !tops.insert(name.clone()) {
            return Err(ScanError::Clash(name));
        }
        walk(p, &name, &md, &mut entries, &mut sources)?;
    }
    let largest = entries.iter().map(|e: &Entry| e.size).max().unwrap_or(0);
    let cs = chunk_size.unwrap_or_else(|| auto_chunk_size(largest));
    Ok(Share {
        manifest: Manifest::new(entries, cs)?,
        sources,
    })
}

fn walk(
    p: &Path,
    rel: &str,
    md: &fs::Metadata,
    entries: &mut Vec<Entry>,
    sources: &mut Vec<Option<PathBuf>>,
) -> Result<(), ScanError> {
    path::validate(rel).map_err(|e| ScanError::Name {
        path: p.to_owned(),
        reason: e.to_string(),
    })?;
    let io = |source| ScanError::Io {
        path: p.to_owned(),
        source,
    };
    let mtime = to_timestamp(md.modified().map_err(io)?);
    let mode = md.permissions().mode() & 0o7777;
    let ft = md.file_type();
    let mut entry = Entry {
        path: rel.to_owned(),
        kind: EntryKind::File,
        size: 0,
        mtime,
        mode,
        link_target: String::new(),
    };
    if ft.is_symlink() {
        let target = fs::read_link(p).map_err(io)?;
        let Some(t) = target
            .to_str()
            .filter(|t| path::validate_link_target(rel, t).is_ok())
        else {
            tracing::warn!(path = %p.display(), "skipping a symbolic link that leads outside the share");
            return Ok(());
        };
        entry.kind = EntryKind::Symlink;
        entry.link_target = t.to_owned();
        entries.push(entry);
        sources.push(None);
    } else if ft.is_dir() {
        entry.kind = EntryKind::Dir;
        entries.push(entry);
        sources.push(None);
        let mut children: Vec<_> = fs::read_dir(p)
            .map_err(io)?
            .collect::<Result<_, _>>()
            .map_err(io)?;
        children.sort_by_key(fs::DirEntry::file_name);
        for c in children {
            let cp = c.path();
            let cmd = fs::symlink_metadata(&cp).map_err(|source| ScanError::Io {
                path: cp.clone(),
                source,
            })?;
            let name = file_name(&cp)?;
            walk(&cp, &format!("{rel}/{name}"), &cmd, entries, sources)?;
        }
    } else if ft.is_file() {
        entry.size = md.len();
        entries.push(entry);
        sources.push(Some(p.to_owned()));
    } else {
        tracing::warn!(path = %p.display(), "skipping a special file");
    }
    Ok(())
}

fn file_name(p: &Path) -> Result<String, ScanError> {
    let canon;
    let p = if p.file_name().is_none() {
        canon = fs::canonicalize(p).map_err(|source| ScanError::Io {
            path: p.to_owned(),
            source,
        })?;
        canon.as_path()
    } else {
        p
    };
    p.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| ScanError::Name {
            path: p.to_owned(),
            reason: "name is not valid UTF-8".into(),
        })
}
