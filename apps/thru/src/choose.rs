//! Choosing what to receive from an offer: `--include` / `--exclude` globs, the `--select`
//! picker, and the tree `thru join --list` prints.
//!
//! A glob is matched against an entry's relative path and against every directory above it,
//! so `--include photos` takes the whole `photos/` tree and `--exclude '*.tmp'` drops
//! `a/b.tmp` (`*` crosses `/`). Directories holding a chosen entry are always chosen too: the
//! entry needs them. What is chosen goes to the sender as the list of wanted entries; it sends
//! nothing else.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use flux_transfer::Manifest;
use flux_wire::EntryKind;
use globset::{Glob, GlobSet, GlobSetBuilder};
use indicatif::HumanBytes;

use crate::ui::{plural, safe_name};

/// `--include` and `--exclude`, compiled.
#[derive(Clone, Debug, Default)]
pub struct Choice {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
}

impl Choice {
    /// Compiles the patterns; an invalid one is an error naming it and its flag.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, String> {
        fn set(flag: &str, pats: &[String]) -> Result<Option<GlobSet>, String> {
            if pats.is_empty() {
                return Ok(None);
            }
            let mut b = GlobSetBuilder::new();
            for p in pats {
                let g = Glob::new(p)
                    .map_err(|e| format!("{flag} {p:?}: not a valid glob: {}", e.kind()))?;
                b.add(g);
            }
            b.build().map(Some).map_err(|e| format!("{flag}: {e}"))
        }
        Ok(Self {
            include: set("--include", include)?,
            exclude: set("--exclude", exclude)?,
        })
    }

    /// Whether every entry is taken (no pattern given).
    pub fn is_all(&self) -> bool {
        self.include.is_none() && self.exclude.is_none()
    }

    /// Whether the entry at `path` is taken by the patterns (before adding parents).
    fn takes(&self, path: &str) -> bool {
        let hit = |set: &GlobSet| prefixes(path).any(|p| set.is_match(p));
        self.include.as_ref().is_none_or(hit) && !self.exclude.as_ref().is_some_and(hit)
    }

    /// The entries of `manifest` to receive, with the directories they lie in.
    pub fn chosen(&self, manifest: &Manifest) -> BTreeSet<u32> {
        let picked = manifest
            .entries()
            .iter()
            .enumerate()
            .filter(|(_, e)| self.takes(&e.path))
            .map(|(i, _)| i as u32);
        with_parents(manifest, picked)
    }
}

/// `a/b/c` → `a`, `a/b`, `a/b/c`.
fn prefixes(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/')
        .map(move |(i, _)| &path[..i])
        .chain(std::iter::once(path))
}

/// `picked` plus every directory entry above a picked entry.
pub fn with_parents(manifest: &Manifest, picked: impl IntoIterator<Item = u32>) -> BTreeSet<u32> {
    let entries = manifest.entries();
    let mut out: BTreeSet<u32> = picked.into_iter().collect();
    let dirs: std::collections::HashMap<&str, u32> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == EntryKind::Dir)
        .map(|(i, e)| (e.path.as_str(), i as u32))
        .collect();
    let mut parents = Vec::new();
    for &i in &out {
        if let Some(e) = entries.get(i as usize) {
            for p in prefixes(&e.path) {
                if p.len() < e.path.len()
                    && let Some(&d) = dirs.get(p)
                {
                    parents.push(d);
                }
            }
        }
    }
    out.extend(parents);
    out
}

/// Files among `chosen`, and their bytes.
pub fn counts(manifest: &Manifest, chosen: &BTreeSet<u32>) -> (u64, u64) {
    chosen
        .iter()
        .filter_map(|&i| manifest.entry(i))
        .filter(|e| e.kind.has_data())
        .fold((0, 0), |(n, b), e| (n + 1, b + e.size))
}

/// The whole offer as a tree (`thru join --list`): one line per entry, indented by depth,
/// directories ending in `/`, files with their size, links with their target, then the
/// counts. Names are escaped (they come from the peer).
pub fn tree(manifest: &Manifest) -> String {
    let entries = manifest.entries();
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|a, b| entries[*a].path.cmp(&entries[*b].path));
    let (mut files, mut dirs, mut links) = (0u64, 0u64, 0u64);
    let mut s = String::new();
    for i in order {
        let e = &entries[i];
        let depth = e.path.matches('/').count();
        let name = e.path.rsplit('/').next().unwrap_or(&e.path);
        let indent = "  ".repeat(depth + 1);
        let _ = match e.kind {
            EntryKind::Dir => {
                dirs += 1;
                writeln!(s, "{indent}{}/", safe_name(name))
            }
            EntryKind::File => {
                files += 1;
                let shown = format!("{indent}{}", safe_name(name));
                writeln!(s, "{shown:<50} {:>10}", HumanBytes(e.size).to_string())
            }
            EntryKind::Stream => {
                files += 1;
                let shown = format!("{indent}{}", safe_name(name));
                writeln!(s, "{shown:<50} {:>10}", "(stream)")
            }
            EntryKind::Symlink => {
                links += 1;
                writeln!(
                    s,
                    "{indent}{} -> {}",
                    safe_name(name),
                    safe_name(&e.link_target)
                )
            }
        };
    }
    format!(
        "The host offers {}, {} and {}, {} in all:\n{s}",
        plural(files, "file", "files"),
        plural(dirs, "directory", "directories"),
        plural(links, "link", "links"),
        HumanBytes(manifest.total_bytes()),
    )
}

/// `--select`: an interactive picker over the offer's files and links, with checkboxes and
/// search (type to filter, space to toggle, → all, ← none, enter to confirm). `preset` is
/// ticked at the start. `Ok(None)`: the user gave up (Esc or Ctrl-C).
pub fn pick(manifest: &Manifest, preset: &BTreeSet<u32>) -> Result<Option<BTreeSet<u32>>, String> {
    let entries = manifest.entries();
    let items: Vec<(u32, String)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind != EntryKind::Dir)
        .map(|(i, e)| {
            let label = match e.kind {
                EntryKind::Symlink => {
                    format!("{} -> {}", safe_name(&e.path), safe_name(&e.link_target))
                }
                _ => format!("{}  ({})", safe_name(&e.path), HumanBytes(e.size)),
            };
            (i as u32, label)
        })
        .collect();
    let labels: Vec<String> = items.iter().map(|(_, l)| l.clone()).collect();
    let ticked: Vec<usize> = items
        .iter()
        .enumerate()
        .filter(|(_, (i, _))| preset.contains(i))
        .map(|(k, _)| k)
        .collect();
    let answer = inquire::MultiSelect::new("Choose what to receive:", labels)
        .with_default(&ticked)
        .with_page_size(15)
        .with_help_message("type to search, space to tick, → all, ← none, enter to confirm")
        .raw_prompt();
    match answer {
        Ok(chosen) => Ok(Some(with_parents(
            manifest,
            chosen
                .into_iter()
                .filter_map(|o| items.get(o.index).map(|(i, _)| *i)),
        ))),
        Err(
            inquire::InquireError::OperationCanceled | inquire::InquireError::OperationInterrupted,
        ) => Ok(None),
        Err(e) => Err(format!("the picker failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flux_wire::{Entry, Timestamp};

    fn manifest(paths: &[(&str, EntryKind)]) -> Manifest {
        let entries = paths
            .iter()
            .map(|(p, k)| Entry {
                path: (*p).into(),
                kind: *k,
                size: if *k == EntryKind::File { 10 } else { 0 },
                mtime: Timestamp::default(),
                mode: 0o644,
                link_target: if *k == EntryKind::Symlink {
                    "x".into()
                } else {
                    String::new()
                },
            })
            .collect();
        Manifest::new(entries, 1 << 20).unwrap()
    }

    #[test]
    fn globs_take_paths_and_trees() {
        use EntryKind::*;
        let m = manifest(&[
            ("d", Dir),
            ("d/a.txt", File),
            ("d/b.log", File),
            ("d/sub", Dir),
            ("d/sub/c.txt", File),
            ("top.txt", File),
        ]);
        let s = |inc: &[&str], exc: &[&str]| {
            let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            let c = Choice::new(&v(inc), &v(exc)).unwrap();
            c.chosen(&m)
                .into_iter()
                .map(|i| m.entry(i).unwrap().path.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(s(&[], &[]).len(), 6);
        assert_eq!(
            s(&["*.txt"], &[]),
            ["d", "d/a.txt", "d/sub", "d/sub/c.txt", "top.txt"]
        );
        assert_eq!(s(&["d/sub"], &[]), ["d", "d/sub", "d/sub/c.txt"]);
        assert_eq!(s(&[], &["d"]), ["top.txt"]);
        assert_eq!(
            s(&["d/*"], &["*.log"]),
            ["d", "d/a.txt", "d/sub", "d/sub/c.txt"]
        );
    }

    #[test]
    fn a_bad_glob_names_the_pattern() {
        let e = Choice::new(&["a[".into()], &[]).unwrap_err();
        assert!(e.contains("--include \"a[\""), "{e}");
        let e = Choice::new(&[], &["{x".into()]).unwrap_err();
        assert!(e.contains("--exclude \"{x\""), "{e}");
    }

    #[test]
    fn tree_shows_sizes_links_and_counts() {
        use EntryKind::*;
        let m = manifest(&[("d", Dir), ("d/a.txt", File), ("l", Symlink)]);
        let t = tree(&m);
        assert!(
            t.starts_with("The host offers 1 file, 1 directory and 1 link"),
            "{t}"
        );
        assert!(
            t.contains("  d/\n") && t.contains("    a.txt") && t.contains("l -> x"),
            "{t}"
        );
    }
}
