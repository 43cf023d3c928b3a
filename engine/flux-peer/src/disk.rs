//! Disk requests performed with `std::fs`, and the receiver's scan of its destination.
//!
//! Safety rules on the receiving side:
//! - paths come from a validated [`Manifest`]; each directory on the way is checked with
//!   `lstat` and created if missing, and a symbolic link anywhere under the destination is
//!   refused, never followed;
//! - data goes to `.<name>.thrupart` with its resume sidecar `.<name>.thrupart.state` beside it,
//!   both created exclusively (`O_EXCL`, `O_NOFOLLOW`) and, when resumed, used only if they are
//!   regular files with a single link; it reaches its final name only when the whole file is
//!   verified;
//! - the final step never replaces an existing entry unless the transfer allows it (a hard link
//!   is attempted first, which fails atomically if the name is taken);
//! - received modes lose setuid, setgid and sticky bits, then the receiver's umask and the group
//!   and world write bits unless [`ModePolicy::Keep`] is chosen (see [`received_mode`]);
//! - a directory that existed before the transfer keeps its mode and times: only directories
//!   this transfer created take the sender's values.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flux_transfer::digest::chunk_hash;
use flux_transfer::{DiskFailure, DiskOp, DiskResult, LocalFile, Manifest, OpId, sidecar};
use flux_wire::{Entry, EntryKind, Timestamp};

/// Open partial or source files kept around between operations.
const MAX_OPEN: usize = 64;

/// Performs a sender's reads from the shared files.
#[derive(Debug)]
pub struct SourceFiles {
    sources: Vec<Option<PathBuf>>,
    open: HashMap<u32, File>,
}

impl SourceFiles {
    /// Reads for manifest entry `i` come from `sources[i]`.
    pub fn new(sources: Vec<Option<PathBuf>>) -> Self {
        Self {
            sources,
            open: HashMap::new(),
        }
    }

    /// The source path of manifest entry `file`.
    pub fn path(&self, file: u32) -> Option<&Path> {
        self.sources.get(file as usize).and_then(Option::as_deref)
    }

    /// Performs one request.
    pub fn execute(&mut self, op: DiskOp) -> (OpId, Result<DiskResult, DiskFailure>) {
        match op {
            DiskOp::Read {
                id,
                file,
                offset,
                len,
            } => (id, self.read(file, offset, len)),
            other => (
                op_id(&other),
                Err(DiskFailure::Io("sender cannot write".into())),
            ),
        }
    }

    fn read(&mut self, file: u32, offset: u64, len: u32) -> Result<DiskResult, DiskFailure> {
        let path = self
            .sources
            .get(file as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| DiskFailure::Io(format!("no source for entry {file}")))?;
        if !self.open.contains_key(&file) {
            if self.open.len() >= MAX_OPEN {
                self.open.clear();
            }
            let f = File::open(path).map_err(|e| io_err("open", path, &e))?;
            self.open.insert(file, f);
        }
        let f = &self.open[&file];
        let mut buf = vec![0u8; len as usize];
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("read", path, &e)),
            }
        }
        buf.truncate(done);
        Ok(DiskResult::Read(Bytes::from(buf)))
    }
}

/// How the sender's permission bits become the received entries' modes.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum ModePolicy {
    /// The default: the sender's bits less the receiver's umask, and never group- or
    /// world-writable.
    #[default]
    Safe,
    /// The sender's read/write/execute bits as sent (`thru join --keep-modes`), umask
    /// ignored, as `tar -p` does.
    Keep,
}

/// The mode a received file or directory is given: setuid, setgid and sticky bits are always
/// dropped; with [`ModePolicy::Safe`], so are the bits of `umask` and group and world write.
pub fn received_mode(sent: u32, umask: u32, policy: ModePolicy) -> u32 {
    let bits = sent & 0o777;
    match policy {
        ModePolicy::Keep => bits,
        ModePolicy::Safe => bits & !(umask & 0o777) & !0o022,
    }
}

/// This process's umask, read once from `/proc/self/status` (reading it with `umask(2)` would
/// briefly change it for every thread). Where that is unavailable, `022` is assumed, which the
/// safe policy's no-group/world-write rule already implies.
pub fn process_umask() -> u32 {
    static UMASK: OnceLock<u32> = OnceLock::new();
    *UMASK.get_or_init(|| {
        fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o022)
    })
}

/// Performs a receiver's writes under a destination directory.
#[derive(Debug)]
pub struct Destination {
    root: PathBuf,
    manifest: Arc<Manifest>,
    open: HashMap<u32, (File, File)>,
    modes: ModePolicy,
    umask: u32,
    /// Directories (relative paths) this transfer created; only these take the sender's mode
    /// and times in [`Destination::finish`].
    created: HashSet<String>,
    /// Paths of the share's links, gathered at the first link put in place.
    links: Option<HashSet<String>>,
    /// See [`Destination::set_resolved_hook`].
    resolved_hook: Option<fn(&Path)>,
}

impl Destination {
    /// Entries of `manifest` land under `root`, which must exist; modes follow
    /// [`ModePolicy::Safe`].
    pub fn new(root: PathBuf, manifest: Arc<Manifest>) -> Self {
        Self::with_modes(root, manifest, ModePolicy::Safe)
    }

    /// As [`Destination::new`], with the given mode policy.
    pub fn with_modes(root: PathBuf, manifest: Arc<Manifest>, modes: ModePolicy) -> Self {
        Self {
            root,
            manifest,
            open: HashMap::new(),
            modes,
            umask: process_umask(),
            created: HashSet::new(),
            links: None,
            resolved_hook: None,
        }
    }

    /// Test seam: `hook` is called with the path of an entry's parent directory each time it
    /// has been resolved, before anything is created, renamed or re-permissioned in it, so that
    /// a test can swap that directory for a symbolic link at the worst moment.
    #[doc(hidden)]
    pub fn set_resolved_hook(&mut self, hook: fn(&Path)) {
        self.resolved_hook = Some(hook);
    }

    /// Performs one request.
    pub fn execute(&mut self, op: DiskOp) -> (OpId, Result<DiskResult, DiskFailure>) {
        let id = op_id(&op);
        let res = match op {
            DiskOp::WriteChunk {
                file,
                index,
                offset,
                hash,
                data,
                ..
            } => self.write_chunk(file, index, offset, &hash, &data),
            DiskOp::Finalize { file, replace, .. } => self.finalize(file, replace),
            DiskOp::Finish { .. } => self.finish(),
            _ => Err(DiskFailure::Io("receiver cannot read".into())),
        };
        (id, res.map(|()| DiskResult::Done))
    }

    /// The relative path of manifest entry `file`, for messages.
    pub fn entry_path(&self, file: u32) -> Option<&str> {
        self.manifest.entry(file).map(|e| e.path.as_str())
    }

    /// What is already at the destination for each file: verified partial chunks (re-hashed
    /// against the partial file's bytes), identical-size complete files (hashed), or conflicts.
    /// A damaged or stale sidecar is removed with its partial file, so the file restarts.
    pub fn scan(&self) -> Result<HashMap<u32, LocalFile>, DiskFailure> {
        let mut out = HashMap::new();
        let cs = self.manifest.chunk_size();
        for (i, e) in self.manifest.entries().iter().enumerate() {
            if e.kind != EntryKind::File {
                continue;
            }
            let i = i as u32;
            let Some((dir, name)) = locate(&self.root, e, None)? else {
                continue;
            };
            let final_path = dir.join(name);
            match fs::symlink_metadata(&final_path) {
                Ok(md) if md.is_file() && md.len() == e.size => {
                    let f =
                        File::open(&final_path).map_err(|err| io_err("open", &final_path, &err))?;
                    let mut hashes = Vec::new();
                    for c in 0..self.manifest.chunk_count(i) {
                        let Some((off, len)) = self.manifest.chunk_span(i, c) else {
                            break;
                        };
                        let data = read_exact(&f, off, len, &final_path)?;
                        hashes.push(chunk_hash(&data));
                    }
                    out.insert(i, LocalFile::Existing(hashes));
                    continue;
                }
                Ok(_) => {
                    out.insert(i, LocalFile::Conflict);
                    continue;
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_err("stat", &final_path, &err)),
            }
            let (part, state) = partial_names(&dir, name);
            let (Ok(bytes), Ok(pf)) = (read_private(&state), open_private(&part, false)) else {
                continue;
            };
            let recorded = match sidecar::parse(&bytes, e, cs) {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!(path = %final_path.display(), error = %err, "discarding partial file");
                    let _ = fs::remove_file(&part);
                    let _ = fs::remove_file(&state);
                    continue;
                }
            };
            let mut good = std::collections::BTreeMap::new();
            for (idx, h) in recorded {
                let Some((off, len)) = self.manifest.chunk_span(i, idx) else {
                    continue;
                };
                match read_exact(&pf, off, len, &part) {
                    Ok(d) if chunk_hash(&d) == h => {
                        good.insert(idx, h);
                    }
                    _ => tracing::debug!(chunk = idx, "partial chunk no longer matches its record"),
                }
            }
            if !good.is_empty() {
                out.insert(i, LocalFile::Partial(good));
            }
        }
        Ok(out)
    }

    fn write_chunk(
        &mut self,
        file: u32,
        index: u32,
        offset: u64,
        hash: &[u8; 32],
        data: &[u8],
    ) -> Result<(), DiskFailure> {
        let path = self.entry(file)?.path.clone();
        let pf = self.open_partial(file)?;
        pf.write_all_at(data, offset)
            .map_err(|err| DiskFailure::Io(format!("{path}: write: {err}")))?;
        self.record(file, index, hash)
    }

    /// The partial file of entry `file`, opened (and its sidecar started or validated) under
    /// the destination's safety rules. An executor that writes chunk data itself (io_uring)
    /// duplicates this descriptor and must call [`Destination::record`] after each write.
    pub fn open_partial(&mut self, file: u32) -> Result<&File, DiskFailure> {
        if !self.open.contains_key(&file) {
            if self.open.len() >= MAX_OPEN {
                self.open.clear();
            }
            let e = self.entry(file)?.clone();
            let (dir, name) = self
                .locate(&e, true)?
                .ok_or_else(|| DiskFailure::Io("no parent".into()))?;
            let (part, state) = partial_names(&dir, name);
            let pf = open_private(&part, true).map_err(|err| io_err("open", &part, &err))?;
            let mut sf = open_private_append(&state).map_err(|err| io_err("open", &state, &err))?;
            let mut bytes = Vec::new();
            let valid = (&sf).read_to_end(&mut bytes).is_ok()
                && bytes.len() >= sidecar::HEADER_LEN
                && sidecar::parse(&bytes, &e, self.manifest.chunk_size()).is_ok();
            if !valid {
                // A fresh start: an unusable sidecar describes nothing worth keeping.
                sf.set_len(0)
                    .map_err(|err| io_err("truncate", &state, &err))?;
                sf.write_all(&sidecar::header(&e, self.manifest.chunk_size()))
                    .map_err(|err| io_err("write", &state, &err))?;
            }
            self.open.insert(file, (pf, sf));
        }
        match self.open.get(&file) {
            Some((pf, _)) => Ok(pf),
            None => Err(DiskFailure::Io(format!(
                "entry {file}: partial file not open"
            ))),
        }
    }

    /// Appends the sidecar record of chunk `index` of entry `file`. Call only after the
    /// chunk's bytes are in the partial file, so a record never describes bytes not yet
    /// written.
    pub fn record(&mut self, file: u32, index: u32, hash: &[u8; 32]) -> Result<(), DiskFailure> {
        let path = self.entry(file)?.path.clone();
        if !self.open.contains_key(&file) {
            self.open_partial(file)?;
        }
        let Some((_, sf)) = self.open.get_mut(&file) else {
            return Err(DiskFailure::Io(format!("{path}: partial file not open")));
        };
        sf.write_all(&sidecar::record(index, hash))
            .map_err(|err| DiskFailure::Io(format!("{path}: sidecar: {err}")))
    }

    fn finalize(&mut self, file: u32, replace: bool) -> Result<(), DiskFailure> {
        let e = self.entry(file)?.clone();
        let (dir, name) = self
            .locate(&e, true)?
            .ok_or_else(|| DiskFailure::Io(format!("{}: no parent directory", e.path)))?;
        let target = dir.join(name);
        match e.kind {
            EntryKind::Dir => match fs::symlink_metadata(&target) {
                // An existing directory is used as it is: its mode and times stay the user's.
                Ok(md) if md.is_dir() => Ok(()),
                Ok(_) => Err(DiskFailure::Exists(e.path.clone())),
                Err(_) => {
                    fs::create_dir(&target).map_err(|err| io_err("mkdir", &target, &err))?;
                    self.created.insert(e.path.clone());
                    Ok(())
                }
            },
            EntryKind::Symlink => {
                self.check_link_path(&e)?;
                if fs::symlink_metadata(&target).is_ok() {
                    if !replace {
                        return Err(DiskFailure::Exists(e.path.clone()));
                    }
                    fs::remove_file(&target).map_err(|err| io_err("remove", &target, &err))?;
                }
                std::os::unix::fs::symlink(&e.link_target, &target)
                    .map_err(|err| io_err("symlink", &target, &err))
            }
            EntryKind::File => {
                let (part, state) = partial_names(&dir, name);
                let pf = match self.open.remove(&file) {
                    Some((pf, _)) => pf,
                    None => open_private(&part, true).map_err(|err| io_err("open", &part, &err))?,
                };
                pf.set_len(e.size)
                    .map_err(|err| io_err("truncate", &part, &err))?;
                pf.set_permissions(fs::Permissions::from_mode(received_mode(
                    e.mode, self.umask, self.modes,
                )))
                .map_err(|err| io_err("chmod", &part, &err))?;
                pf.set_modified(to_system_time(e.mtime))
                    .map_err(|err| io_err("set mtime", &part, &err))?;
                drop(pf);
                place(&part, &target, replace).map_err(|err| match err.kind() {
                    io::ErrorKind::AlreadyExists => DiskFailure::Exists(e.path.clone()),
                    _ => io_err("rename", &target, &err),
                })?;
                let _ = fs::remove_file(&state);
                Ok(())
            }
        }
    }

    fn finish(&mut self) -> Result<(), DiskFailure> {
        let mut dirs: Vec<&Entry> = self
            .manifest
            .entries()
            .iter()
            .filter(|e| e.kind == EntryKind::Dir)
            .collect();
        // Deepest first: setting a child's time must not be undone by touching its parent.
        dirs.sort_by_key(|e| std::cmp::Reverse(e.path.matches('/').count()));
        for e in dirs {
            if !self.created.contains(&e.path) {
                // It existed before this transfer (or an earlier, interrupted one made it):
                // never re-permission or re-time a directory the user already had.
                continue;
            }
            let p = self.root.join(&e.path);
            let md = fs::symlink_metadata(&p).map_err(|err| io_err("stat", &p, &err))?;
            if !md.is_dir() {
                return Err(DiskFailure::Io(format!(
                    "{}: no longer a directory",
                    e.path
                )));
            }
            let mode = received_mode(e.mode, self.umask, self.modes) | 0o700;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .map_err(|err| io_err("chmod", &p, &err))?;
            let f = File::open(&p).map_err(|err| io_err("open", &p, &err))?;
            f.set_modified(to_system_time(e.mtime))
                .map_err(|err| io_err("set mtime", &p, &err))?;
        }
        Ok(())
    }

    /// Refuses link `e` when its target, resolved lexically from the link's directory, passes
    /// through or ends at a symbolic link already under the destination that is not one of the
    /// share's own links (whose targets the manifest checked): such a link could point anywhere.
    fn check_link_path(&mut self, e: &Entry) -> Result<(), DiskFailure> {
        let links = self.links.get_or_insert_with(|| {
            self.manifest
                .entries()
                .iter()
                .filter(|e| e.kind == EntryKind::Symlink)
                .map(|e| e.path.clone())
                .collect()
        });
        let refuse = |why: String| {
            DiskFailure::Io(format!(
                "link {} -> {}: {why}",
                flux_transfer::path::Escaped(&e.path),
                flux_transfer::path::Escaped(&e.link_target)
            ))
        };
        let mut at: Vec<&str> = e.path.split('/').collect();
        at.pop();
        let parts: Vec<&str> = e
            .link_target
            .split('/')
            .filter(|p| !matches!(*p, "" | "."))
            .collect();
        for (i, part) in parts.iter().enumerate() {
            if *part == ".." {
                if at.pop().is_none() {
                    return Err(refuse("leads outside the destination".into()));
                }
                continue;
            }
            at.push(part);
            let rel = at.join("/");
            let p = self.root.join(&rel);
            match fs::symlink_metadata(&p) {
                Ok(md) if md.file_type().is_symlink() => {
                    if i + 1 == parts.len() && links.contains(&rel) {
                        continue;
                    }
                    return Err(refuse(format!(
                        "passes through {}, a symbolic link already under the destination",
                        p.display()
                    )));
                }
                Ok(md) if md.is_dir() => {}
                // A file, or nothing yet: nothing further can be a link already there.
                _ => break,
            }
        }
        Ok(())
    }

    fn entry(&self, file: u32) -> Result<&Entry, DiskFailure> {
        self.manifest
            .entry(file)
            .ok_or_else(|| DiskFailure::Io(format!("no entry {file}")))
    }

    /// The parent directory and final name of `e`, checking every directory on the way: each
    /// must be a real directory (not a link). With `create`, missing ones are made; without,
    /// `None` means one is missing.
    fn locate<'e>(
        &mut self,
        e: &'e Entry,
        create: bool,
    ) -> Result<Option<(PathBuf, &'e str)>, DiskFailure> {
        let found = locate(&self.root, e, create.then_some(&mut self.created))?;
        if let (Some(hook), Some((dir, _))) = (self.resolved_hook, &found) {
            hook(dir);
        }
        Ok(found)
    }
}

/// [`Destination::locate`] on `root`; with `created`, missing directories are made and their
/// relative paths recorded there.
fn locate<'e>(
    root: &Path,
    e: &'e Entry,
    mut created: Option<&mut HashSet<String>>,
) -> Result<Option<(PathBuf, &'e str)>, DiskFailure> {
    let mut parts: Vec<&str> = e.path.split('/').collect();
    let name = parts.pop().unwrap_or_default();
    let mut dir = root.to_path_buf();
    let mut rel = String::new();
    for p in parts {
        dir.push(p);
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(p);
        match fs::symlink_metadata(&dir) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(DiskFailure::Io(format!(
                    "{}: refusing to follow the symbolic link at {}",
                    e.path,
                    dir.display()
                )));
            }
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(DiskFailure::Exists(dir.display().to_string())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let Some(created) = created.as_deref_mut() else {
                    return Ok(None);
                };
                fs::create_dir(&dir).map_err(|err| io_err("mkdir", &dir, &err))?;
                created.insert(rel.clone());
            }
            Err(err) => return Err(io_err("stat", &dir, &err)),
        }
    }
    Ok(Some((dir, name)))
}

/// Moves `from` to `to`, replacing an existing `to` only when allowed.
fn place(from: &Path, to: &Path, replace: bool) -> io::Result<()> {
    if replace {
        return fs::rename(from, to);
    }
    // A hard link fails atomically if `to` exists; fall back to a checked rename where links are
    // unsupported.
    match fs::hard_link(from, to) {
        Ok(()) => fs::remove_file(from),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(e),
        Err(_) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            fs::rename(from, to)
        }
    }
}

fn partial_names(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    // Keep temporary names within NAME_MAX: long names get a hashed stand-in.
    let base = if name.len() <= 200 {
        format!(".{name}.thrupart")
    } else {
        format!(
            ".{}.thrupart",
            &blake3::hash(name.as_bytes()).to_hex()[..32]
        )
    };
    (dir.join(&base), dir.join(format!("{base}.state")))
}

/// Opens a partial file or sidecar: never through a symbolic link (`O_NOFOLLOW`), never
/// blocking on a FIFO (`O_NONBLOCK`, no effect on regular files). With `write`, a new file is
/// created exclusively (`O_CREAT|O_EXCL`, mode 0600); an existing one (a resume) must then be a
/// regular file with a single link, so that a hard link planted by another local user to one
/// of the receiving user's files is never written through.
fn open_private(p: &Path, write: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .mode(0o600);
    private(open_exclusive_or_existing(&o, p, write)?)
}

/// [`open_private`] for appending (the sidecar), readable too.
fn open_private_append(p: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .mode(0o600);
    private(open_exclusive_or_existing(&o, p, true)?)
}

fn open_exclusive_or_existing(o: &OpenOptions, p: &Path, create: bool) -> io::Result<File> {
    if create {
        match o.clone().create_new(true).open(p) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            other => return other,
        }
    }
    o.open(p)
}

/// `f` if it is a regular file with exactly one link.
fn private(f: File) -> io::Result<File> {
    let md = f.metadata()?;
    if !md.file_type().is_file() {
        return Err(io::Error::other("not a regular file; refusing to use it"));
    }
    if md.nlink() != 1 {
        return Err(io::Error::other(format!(
            "has {} hard links; refusing to write through a link",
            md.nlink()
        )));
    }
    Ok(f)
}

/// The whole of a sidecar, read under [`open_private`]'s rules.
fn read_private(p: &Path) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    open_private(p, false)?.read_to_end(&mut buf)?;
    Ok(buf)
}

fn read_exact(f: &File, off: u64, len: u32, p: &Path) -> Result<Vec<u8>, DiskFailure> {
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off)
        .map_err(|e| io_err("read", p, &e))?;
    Ok(buf)
}

fn to_system_time(t: Timestamp) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nanos));
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.secs.unsigned_abs()) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + nanos
    }
}

/// Converts a file time to the wire's form.
pub fn to_timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (secs, nanos) = if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            };
            Timestamp { secs, nanos }
        }
    }
}

fn op_id(op: &DiskOp) -> OpId {
    match op {
        DiskOp::Read { id, .. }
        | DiskOp::WriteChunk { id, .. }
        | DiskOp::Finalize { id, .. }
        | DiskOp::Finish { id } => *id,
        _ => OpId(u64::MAX),
    }
}

fn io_err(op: &str, p: &Path, e: &io::Error) -> DiskFailure {
    DiskFailure::Io(format!("{op} {}: {e}", p.display()))
}
