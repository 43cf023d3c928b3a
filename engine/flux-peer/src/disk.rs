//! Disk requests performed with `std::fs` (and, under the receiver's destination, `*at` calls
//! through `rustix`), and the receiver's scan of its destination.
//!
//! Safety rules on the receiving side:
//! - paths come from a validated [`Manifest`]; each directory on the way is checked and created
//!   if missing, and a symbolic link anywhere under the destination is refused, never followed;
//! - every create, rename, link, removal, chmod and utimes under the destination goes through
//!   directory descriptors: the destination is opened once, an entry's parent is resolved from it
//!   with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` where the kernel has it (Linux 5.6),
//!   else one component at a time with `openat(O_NOFOLLOW | O_DIRECTORY)`, and the entry is then
//!   reached with `*at` calls relative to its parent, so a directory swapped for a symbolic link
//!   mid-transfer cannot redirect any of them outside the destination;
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
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flux_transfer::digest::chunk_hash;
use flux_transfer::{
    ChunkData, DiskFailure, DiskOp, DiskResult, LocalFile, Manifest, OpId, sidecar,
};
use flux_wire::{Entry, EntryKind, Timestamp};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

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
                compress,
            } => (id, self.read(file, offset, len, compress)),
            other => (
                other.id(),
                Err(DiskFailure::Io("sender cannot write".into())),
            ),
        }
    }

    fn read(
        &mut self,
        file: u32,
        offset: u64,
        len: u32,
        compress: Option<i32>,
    ) -> Result<DiskResult, DiskFailure> {
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
        let (data, hash, compressed) = crate::work::hash_chunk(Bytes::from(buf), compress);
        Ok(DiskResult::Read {
            data,
            hash,
            compressed,
        })
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

/// The user's answers for offered entries that clash with what is at the destination, given
/// at accept ([`Destination::set_resolutions`]). Unanswered clashes follow the machine's
/// `overwrite` setting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolutions {
    /// Entries to leave out: received (the sender cannot leave them out of its offer) but never
    /// written; what is here stays untouched.
    pub skip: HashSet<u32>,
    /// Entries to put under another name in the same directory (a last path component,
    /// e.g. `report (1).pdf`); what is here stays untouched.
    pub rename: HashMap<u32, String>,
    /// Entries that replace what is here.
    pub replace: HashSet<u32>,
}

impl Resolutions {
    /// Every entry with an answer.
    pub fn answered(&self) -> impl Iterator<Item = u32> + '_ {
        self.skip
            .iter()
            .chain(self.rename.keys())
            .chain(self.replace.iter())
            .copied()
    }
}

/// Performs a receiver's writes under a destination directory.
#[derive(Debug)]
pub struct Destination {
    root: PathBuf,
    /// `root`, opened once (`O_PATH`): everything below is reached from it.
    root_fd: OnceLock<OwnedFd>,
    manifest: Arc<Manifest>,
    /// Partial files open for writing, with their sidecars (none for single-chunk files).
    open: HashMap<u32, (File, Option<File>)>,
    modes: ModePolicy,
    umask: u32,
    /// Directories (relative paths) this transfer created; only these take the sender's mode
    /// and times in [`Destination::finish`].
    created: HashSet<String>,
    /// Paths of the share's links, gathered at the first link put in place.
    links: Option<HashSet<String>>,
    /// See [`Destination::set_resolved_hook`].
    resolved_hook: Option<fn(&Path)>,
    /// Whether files and directories are synced before the transfer counts as done.
    durable: bool,
    /// Time spent syncing so far.
    sync_time: Duration,
    /// Directories entries were put in, to sync at the end when durable.
    touched: HashSet<PathBuf>,
    /// The user's answers for clashing entries.
    resolved: Resolutions,
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
            root_fd: OnceLock::new(),
            manifest,
            open: HashMap::new(),
            modes,
            umask: process_umask(),
            created: HashSet::new(),
            links: None,
            resolved_hook: None,
            durable: false,
            sync_time: Duration::ZERO,
            touched: HashSet::new(),
            resolved: Resolutions::default(),
        }
    }

    /// Applies the user's answers for clashing entries (before any of their chunks arrive).
    /// A new name must be one path component that the path rules accept.
    pub fn set_resolutions(&mut self, r: Resolutions) {
        self.resolved = r;
    }

    /// Whether entry `file` is left out (its chunks are verified and dropped).
    pub fn is_skipped(&self, file: u32) -> bool {
        self.resolved.skip.contains(&file)
    }

    /// With `durable`, each file's data is synced (`fdatasync`) before it is renamed into
    /// place, and every directory an entry went into is synced (`fsync`) at the end, so that a
    /// transfer reported done survives a power loss. The time it took is
    /// [`sync_time`](Self::sync_time).
    pub fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    /// Time spent syncing to stable storage (zero unless durable).
    pub fn sync_time(&self) -> Duration {
        self.sync_time
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
        let id = op.id();
        let res = match op {
            DiskOp::WriteChunk {
                file,
                index,
                offset,
                hash,
                data,
                compressed,
                ..
            } => self.write_chunk(file, index, offset, &hash, &data, compressed),
            DiskOp::Finalize {
                file,
                replace,
                size,
                ..
            } => self.finalize(file, replace, size),
            DiskOp::Finish { .. } => self.finish(),
            _ => Err(DiskFailure::Io("receiver cannot read".into())),
        };
        (id, res.map(|()| DiskResult::Done))
    }

    /// Where entry `file` lands (its final path), for messages.
    pub fn final_path(&self, file: u32) -> Option<PathBuf> {
        self.manifest.entry(file).map(|e| self.root.join(&e.path))
    }

    /// Bytes of the files this transfer writes (entries left out by the user excluded).
    pub fn bytes_to_write(&self) -> u64 {
        (0..self.manifest.len() as u32)
            .filter(|&i| !self.is_skipped(i))
            .filter_map(|i| self.manifest.entry(i))
            .map(|e| e.size)
            .sum()
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
        let root_fd = open_root(&self.root_fd, &self.root)?;
        for (i, e) in self.manifest.entries().iter().enumerate() {
            if !e.kind.has_data() {
                continue;
            }
            let i = i as u32;
            let Some((dir, name)) = locate(&self.root, root_fd, e, None)? else {
                continue;
            };
            let final_path = dir.path.join(name);
            if e.kind == EntryKind::Stream {
                // A stream's size is unknown, so nothing here can be the same bytes, and it
                // keeps no sidecar: anything at its name is a conflict, and a partial file
                // left by an interrupted stream starts over (see `open_partial`).
                if lstat_at(&dir.fd, name).is_ok() {
                    out.insert(i, LocalFile::Conflict);
                }
                continue;
            }
            match lstat_at(&dir.fd, name) {
                Ok(st) if is_type(&st, FileType::RegularFile) && file_size(&st) == e.size => {
                    let f = open_at(&dir.fd, name, OFlags::RDONLY)
                        .map_err(|err| io_err("open", &final_path, &err))?;
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
            let (part, state) = partial_names(name);
            let (Ok(bytes), Ok(pf)) = (
                read_private(&dir.fd, &state),
                open_private(&dir.fd, &part, false),
            ) else {
                continue;
            };
            let recorded = match sidecar::parse(&bytes, e, cs) {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!(path = %final_path.display(), error = %err, "discarding partial file");
                    let _ = rustix::fs::unlinkat(&dir.fd, &part, AtFlags::empty());
                    let _ = rustix::fs::unlinkat(&dir.fd, &state, AtFlags::empty());
                    continue;
                }
            };
            let mut good = std::collections::BTreeMap::new();
            for (idx, h) in recorded {
                let Some((off, len)) = self.manifest.chunk_span(i, idx) else {
                    continue;
                };
                match read_exact(&pf, off, len, &dir.path.join(&part)) {
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
        data: &ChunkData,
        compressed: Option<u32>,
    ) -> Result<(), DiskFailure> {
        if self.is_skipped(file) {
            // Left out by the user: received, never written (as the io_uring path does).
            return Ok(());
        }
        // Verified before anything is written: no unverified byte reaches the partial file.
        let data = match compressed {
            Some(n) => {
                let mut plain = vec![0u8; n as usize];
                crate::work::gather_chunk(data, compressed, hash, &mut plain)?;
                Bytes::from(plain)
            }
            None => data.to_contiguous(),
        };
        if chunk_hash(&data) != *hash {
            return Err(DiskFailure::Corrupt);
        }
        let path = self.entry(file)?.path.clone();
        let pf = self.open_partial(file)?;
        pf.write_all_at(&data, offset)
            .map_err(|err| io_err("write", &self.root.join(&path), &err))?;
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
            let (part, state) = partial_names(name);
            let pf = open_private(&dir.fd, &part, true)
                .map_err(|err| io_err("open", &dir.path.join(&part), &err))?;
            if e.kind == EntryKind::Stream {
                let left = pf.metadata().map_or(0, |m| m.len());
                if left > 0 {
                    tracing::warn!(
                        path = %dir.path.join(name).display(),
                        bytes = left,
                        "a partial file left by an interrupted stream: a stream cannot be \
                         resumed, so it is received again from the start"
                    );
                    pf.set_len(0)
                        .map_err(|err| io_err("truncate", &dir.path.join(&part), &err))?;
                }
            }
            // A file of one chunk has nothing to resume partway: it needs no sidecar (a
            // partial file without one is fetched whole again). This spares small files two
            // inode creations and deletions, the receiver's main cost for many small files.
            let sf = if self.manifest.chunk_count(file) > 1 {
                Some(self.open_sidecar(&dir, &state, &e)?)
            } else {
                if pf.metadata().is_ok_and(|m| m.len() > 0) {
                    // Left by an interrupted run that cut the file into more chunks: its
                    // sidecar, if any, describes nothing this run keeps.
                    let _ = rustix::fs::unlinkat(&dir.fd, &state, AtFlags::empty());
                }
                None
            };
            self.open.insert(file, (pf, sf));
        }
        match self.open.get(&file) {
            Some((pf, _)) => Ok(pf),
            None => Err(DiskFailure::Io(format!(
                "entry {file}: partial file not open"
            ))),
        }
    }

    /// Opens (or starts afresh) the sidecar `state` of entry `e` in `dir`.
    fn open_sidecar(&self, dir: &Dir, state: &str, e: &Entry) -> Result<File, DiskFailure> {
        let state_path = dir.path.join(state);
        let mut sf =
            open_private_append(&dir.fd, state).map_err(|err| io_err("open", &state_path, &err))?;
        let mut bytes = Vec::new();
        let valid = (&sf).read_to_end(&mut bytes).is_ok()
            && bytes.len() >= sidecar::HEADER_LEN
            && sidecar::parse(&bytes, e, self.manifest.chunk_size()).is_ok();
        if !valid {
            // A fresh start: an unusable sidecar describes nothing worth keeping.
            sf.set_len(0)
                .map_err(|err| io_err("truncate", &state_path, &err))?;
            sf.write_all(&sidecar::header(e, self.manifest.chunk_size()))
                .map_err(|err| io_err("write", &state_path, &err))?;
        }
        Ok(sf)
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
        let Some(sf) = sf else {
            // A single-chunk file keeps no sidecar.
            return Ok(());
        };
        sf.write_all(&sidecar::record(index, hash))
            .map_err(|err| DiskFailure::Io(format!("{path}: sidecar: {err}")))
    }

    fn finalize(&mut self, file: u32, replace: bool, size: Option<u64>) -> Result<(), DiskFailure> {
        let e = self.entry(file)?.clone();
        let (dir, name) = self
            .locate(&e, true)?
            .ok_or_else(|| DiskFailure::Io(format!("{}: no parent directory", e.path)))?;
        let target = dir.path.join(name);
        if self.durable {
            self.touched.insert(dir.path.clone());
        }
        match e.kind {
            EntryKind::Dir => match lstat_at(&dir.fd, name) {
                // An existing directory is used as it is: its mode and times stay the user's.
                Ok(st) if is_type(&st, FileType::Directory) => Ok(()),
                Ok(_) => Err(DiskFailure::Exists(e.path.clone())),
                Err(_) => {
                    rustix::fs::mkdirat(&dir.fd, name, Mode::from_raw_mode(0o777))
                        .map_err(|err| io_err("mkdir", &target, &err.into()))?;
                    self.created.insert(e.path.clone());
                    Ok(())
                }
            },
            EntryKind::Symlink => {
                self.check_link_path(&e)?;
                if lstat_at(&dir.fd, name).is_ok() {
                    if !replace {
                        return Err(DiskFailure::Exists(e.path.clone()));
                    }
                    rustix::fs::unlinkat(&dir.fd, name, AtFlags::empty())
                        .map_err(|err| io_err("remove", &target, &err.into()))?;
                }
                rustix::fs::symlinkat(e.link_target.as_str(), &dir.fd, name)
                    .map_err(|err| io_err("symlink", &target, &err.into()))
            }
            EntryKind::File | EntryKind::Stream if self.resolved.skip.contains(&file) => {
                // Left out: nothing of it was written; what is here stays.
                let (part, state) = partial_names(name);
                let _ = rustix::fs::unlinkat(&dir.fd, &part, AtFlags::empty());
                let _ = rustix::fs::unlinkat(&dir.fd, &state, AtFlags::empty());
                self.open.remove(&file);
                Ok(())
            }
            EntryKind::File | EntryKind::Stream => {
                let (part, state) = partial_names(name);
                let final_name = match self.resolved.rename.get(&file) {
                    Some(n) => {
                        let why = match flux_transfer::path::validate(n) {
                            Ok(parts) if parts.len() == 1 => None,
                            Ok(_) => Some("a name, not a path, is needed".to_string()),
                            Err(err) => Some(err.to_string()),
                        };
                        if let Some(why) = why {
                            return Err(DiskFailure::Io(format!(
                                "{}: new name {n:?}: {why}",
                                e.path
                            )));
                        }
                        n.clone()
                    }
                    None => name.to_owned(),
                };
                let replace = replace || self.resolved.replace.contains(&file);
                let target = dir.path.join(&final_name);
                let part_path = dir.path.join(&part);
                let (pf, sidecar) = match self.open.remove(&file) {
                    Some((pf, sf)) => (pf, sf.is_some()),
                    None => (
                        open_private(&dir.fd, &part, true)
                            .map_err(|err| io_err("open", &part_path, &err))?,
                        true,
                    ),
                };
                // Most files were written to their full length already: a stat is cheaper
                // than a truncate (which takes the inode lock and a journal update on ext4),
                // and many small files make it count.
                let want = size.unwrap_or(e.size);
                if pf.metadata().map_or(true, |m| m.len() != want) {
                    pf.set_len(want)
                        .map_err(|err| io_err("truncate", &part_path, &err))?;
                }
                pf.set_permissions(fs::Permissions::from_mode(received_mode(
                    e.mode, self.umask, self.modes,
                )))
                .map_err(|err| io_err("chmod", &part_path, &err))?;
                pf.set_modified(to_system_time(e.mtime))
                    .map_err(|err| io_err("set mtime", &part_path, &err))?;
                if self.durable {
                    // Data before the name: a file renamed into place is whole after a crash.
                    let t = std::time::Instant::now();
                    pf.sync_data()
                        .map_err(|err| io_err("sync", &part_path, &err))?;
                    self.sync_time += t.elapsed();
                }
                drop(pf);
                place(&dir.fd, &part, &final_name, replace).map_err(|err| match err.kind() {
                    io::ErrorKind::AlreadyExists => DiskFailure::Exists(e.path.clone()),
                    _ => io_err("rename", &target, &err),
                })?;
                // A single-chunk file opened this run keeps no sidecar: nothing to remove (a
                // failed lookup per small file otherwise).
                if sidecar {
                    let _ = rustix::fs::unlinkat(&dir.fd, &state, AtFlags::empty());
                }
                Ok(())
            }
        }
    }

    fn finish(&mut self) -> Result<(), DiskFailure> {
        self.apply_dir_times()?;
        if self.durable {
            // The renames (and the directories made) become durable with their directories.
            let t = std::time::Instant::now();
            self.touched.insert(self.root.clone());
            for d in std::mem::take(&mut self.touched) {
                File::open(&d)
                    .and_then(|f| f.sync_all())
                    .map_err(|err| io_err("sync", &d, &err))?;
            }
            self.sync_time += t.elapsed();
        }
        Ok(())
    }

    fn apply_dir_times(&mut self) -> Result<(), DiskFailure> {
        let manifest = self.manifest.clone();
        let mut dirs: Vec<&Entry> = manifest
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
            let gone = || DiskFailure::Io(format!("{}: no longer a directory", e.path));
            let (dir, name) = self.locate(e, false)?.ok_or_else(gone)?;
            let st = lstat_at(&dir.fd, name).map_err(|err| io_err("stat", &p, &err))?;
            if !is_type(&st, FileType::Directory) {
                return Err(gone());
            }
            // Changed through a descriptor of the directory itself, never by path.
            let f = open_at(&dir.fd, name, OFlags::RDONLY | OFlags::DIRECTORY)
                .map_err(|err| io_err("open", &p, &err))?;
            let mode = received_mode(e.mode, self.umask, self.modes) | 0o700;
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|err| io_err("chmod", &p, &err))?;
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
    ) -> Result<Option<(Dir, &'e str)>, DiskFailure> {
        let root_fd = open_root(&self.root_fd, &self.root)?;
        let found = locate(&self.root, root_fd, e, create.then_some(&mut self.created))?;
        if let (Some(hook), Some((dir, _))) = (self.resolved_hook, &found) {
            hook(&dir.path);
        }
        Ok(found)
    }
}

/// A directory under the destination: a descriptor (`O_PATH`) that everything done in it goes
/// through, and its path, for messages only.
#[derive(Debug)]
struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// The destination's descriptor in `cell`, opening `root` (the user's choice, so a symbolic link
/// there is followed) the first time.
fn open_root<'a>(cell: &'a OnceLock<OwnedFd>, root: &Path) -> Result<BorrowedFd<'a>, DiskFailure> {
    if cell.get().is_none() {
        let fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| io_err("open", root, &err.into()))?;
        let _ = cell.set(fd);
    }
    cell.get()
        .map(AsFd::as_fd)
        .ok_or_else(|| DiskFailure::Io(format!("{}: not open", root.display())))
}

/// [`Destination::locate`] on `root`; with `created`, missing directories are made and their
/// relative paths recorded there.
///
/// The parent is resolved from `root_fd` in one `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
/// where the kernel has it. Otherwise, or when that fails (a directory missing, or refused), it
/// is walked one component at a time, each checked with `fstatat(AT_SYMLINK_NOFOLLOW)`, made with
/// `mkdirat` if missing, and opened with `openat(O_NOFOLLOW | O_DIRECTORY)` relative to the one
/// before, which also gives the precise error.
fn locate<'e>(
    root: &Path,
    root_fd: BorrowedFd<'_>,
    e: &'e Entry,
    mut created: Option<&mut HashSet<String>>,
) -> Result<Option<(Dir, &'e str)>, DiskFailure> {
    let (parent, name) = e.path.rsplit_once('/').unwrap_or(("", &e.path));
    let dup = |fd: BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .map_err(|err| io_err("dup", root, &err))
    };
    if !parent.is_empty()
        && let Some(fd) = open_beneath(root_fd, parent)
    {
        let path = root.join(parent);
        return Ok(Some((Dir { fd, path }, name)));
    }
    let mut dir = Dir {
        fd: dup(root_fd)?,
        path: root.to_path_buf(),
    };
    let mut rel = String::new();
    for p in parent.split('/').filter(|p| !p.is_empty()) {
        dir.path.push(p);
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(p);
        match lstat_at(&dir.fd, p) {
            Ok(st) if is_type(&st, FileType::Symlink) => {
                return Err(DiskFailure::Io(format!(
                    "{}: refusing to follow the symbolic link at {}",
                    e.path,
                    dir.path.display()
                )));
            }
            Ok(st) if is_type(&st, FileType::Directory) => {}
            Ok(_) => return Err(DiskFailure::Exists(dir.path.display().to_string())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let Some(created) = created.as_deref_mut() else {
                    return Ok(None);
                };
                rustix::fs::mkdirat(&dir.fd, p, Mode::from_raw_mode(0o777))
                    .map_err(|err| io_err("mkdir", &dir.path, &err.into()))?;
                created.insert(rel.clone());
            }
            Err(err) => return Err(io_err("stat", &dir.path, &err)),
        }
        // Swapped for a link since the check above: `O_NOFOLLOW` makes this fail.
        dir.fd = rustix::fs::openat(
            &dir.fd,
            p,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| io_err("open", &dir.path, &err.into()))?;
    }
    Ok(Some((dir, name)))
}

/// Set once `openat2` is found missing (`ENOSYS`); from then on parents are walked.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// `rel` (several components) opened as a directory (`O_PATH`) beneath `dir` with `openat2`,
/// following no symbolic link and never leaving `dir`; `None` when that fails or the kernel lacks
/// `openat2` (remembered), for the caller to walk the components instead.
fn open_beneath(dir: BorrowedFd<'_>, rel: &str) -> Option<OwnedFd> {
    if NO_OPENAT2.load(Ordering::Relaxed) {
        return None;
    }
    match rustix::fs::openat2(
        dir,
        rel,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => Some(fd),
        Err(Errno::NOSYS) => {
            NO_OPENAT2.store(true, Ordering::Relaxed);
            None
        }
        Err(_) => None,
    }
}

/// `name` in `dir`, not following a symbolic link.
fn lstat_at(dir: impl AsFd, name: &str) -> io::Result<Stat> {
    Ok(rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

fn is_type(st: &Stat, t: FileType) -> bool {
    FileType::from_raw_mode(st.st_mode) == t
}

fn file_size(st: &Stat) -> u64 {
    u64::try_from(st.st_size).unwrap_or(0)
}

/// `name` in `dir`, opened with `flags` and never through a symbolic link (`O_NOFOLLOW`) nor
/// blocking on a FIFO (`O_NONBLOCK`).
fn open_at(dir: impl AsFd, name: &str, flags: OFlags) -> io::Result<File> {
    let flags = flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    Ok(File::from(rustix::fs::openat(
        dir,
        name,
        flags,
        Mode::empty(),
    )?))
}

/// Moves `from` to `to`, both in `dir`, replacing an existing `to` only when allowed.
fn place(dir: impl AsFd, from: &str, to: &str, replace: bool) -> io::Result<()> {
    let dir = dir.as_fd();
    if replace {
        return Ok(rustix::fs::renameat(dir, from, dir, to)?);
    }
    // One atomic step that fails if `to` exists; where the filesystem lacks RENAME_NOREPLACE,
    // a hard link (which fails atomically too), and else a checked rename.
    match rustix::fs::renameat_with(dir, from, dir, to, rustix::fs::RenameFlags::NOREPLACE) {
        Ok(()) => return Ok(()),
        Err(Errno::EXIST) => return Err(io::Error::from(io::ErrorKind::AlreadyExists)),
        Err(_) => {}
    }
    match rustix::fs::linkat(dir, from, dir, to, AtFlags::empty()) {
        Ok(()) => Ok(rustix::fs::unlinkat(dir, from, AtFlags::empty())?),
        Err(Errno::EXIST) => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
        Err(_) => {
            if lstat_at(dir, to).is_ok() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            Ok(rustix::fs::renameat(dir, from, dir, to)?)
        }
    }
}

/// The names of the partial file and its sidecar for an entry named `name`, in its directory.
fn partial_names(name: &str) -> (String, String) {
    // Keep temporary names within NAME_MAX: long names get a hashed stand-in.
    let base = if name.len() <= 200 {
        format!(".{name}.thrupart")
    } else {
        format!(
            ".{}.thrupart",
            &blake3::hash(name.as_bytes()).to_hex()[..32]
        )
    };
    let state = format!("{base}.state");
    (base, state)
}

/// Opens a partial file or sidecar: never through a symbolic link (`O_NOFOLLOW`), never
/// blocking on a FIFO (`O_NONBLOCK`, no effect on regular files). With `write`, a new file is
/// created exclusively (`O_CREAT|O_EXCL`, mode 0600); an existing one (a resume) must then be a
/// regular file with a single link, so that a hard link planted by another local user to one
/// of the receiving user's files is never written through. `name` is in `dir`.
fn open_private(dir: impl AsFd, name: &str, write: bool) -> io::Result<File> {
    let access = if write { OFlags::RDWR } else { OFlags::RDONLY };
    private(open_exclusive_or_existing(dir, name, access, write)?)
}

/// [`open_private`] for appending (the sidecar), readable too.
fn open_private_append(dir: impl AsFd, name: &str) -> io::Result<File> {
    private(open_exclusive_or_existing(
        dir,
        name,
        OFlags::RDWR | OFlags::APPEND,
        true,
    )?)
}

fn open_exclusive_or_existing(
    dir: impl AsFd,
    name: &str,
    flags: OFlags,
    create: bool,
) -> io::Result<File> {
    if create {
        let excl = flags | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        match rustix::fs::openat(
            dir.as_fd(),
            name,
            excl | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Err(Errno::EXIST) => {}
            other => return Ok(File::from(other?)),
        }
    }
    open_at(dir, name, flags)
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
fn read_private(dir: impl AsFd, name: &str) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    open_private(dir, name, false)?.read_to_end(&mut buf)?;
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

fn io_err(op: &str, p: &Path, e: &io::Error) -> DiskFailure {
    if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
        return DiskFailure::NoSpace(p.display().to_string());
    }
    DiskFailure::Io(format!("{op} {}: {e}", p.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::File,
            size: 0,
            mtime: Timestamp { secs: 0, nanos: 0 },
            mode: 0o644,
            link_target: String::new(),
        }
    }

    /// Without `openat2` (Linux before 5.6), the component walk alone resolves an existing
    /// parent to a descriptor of that very directory, makes missing ones, and refuses a component
    /// swapped for a symbolic link, naming it. (Marking `openat2` missing affects other tests of
    /// this process only by making them take this same path.)
    #[test]
    fn component_walk_without_openat2() {
        NO_OPENAT2.store(true, Ordering::Relaxed);
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("out");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/marker"), "").unwrap();
        let cell = OnceLock::new();
        let root_fd = open_root(&cell, &root).unwrap();

        let e = entry("a/b/f");
        let (dir, name) = locate(&root, root_fd, &e, None).unwrap().unwrap();
        assert_eq!(
            (dir.path.as_path(), name),
            (root.join("a/b").as_path(), "f")
        );
        assert!(lstat_at(&dir.fd, "marker").is_ok());

        let mut created = HashSet::new();
        let e = entry("x/y/f");
        assert!(locate(&root, root_fd, &e, None).unwrap().is_none());
        locate(&root, root_fd, &e, Some(&mut created))
            .unwrap()
            .unwrap();
        assert!(root.join("x/y").is_dir());
        assert_eq!(created, HashSet::from(["x".into(), "x/y".into()]));

        let outside = tmp.path().join("outside");
        fs::create_dir_all(outside.join("b")).unwrap();
        fs::rename(root.join("a/b"), root.join("a/b.moved")).unwrap();
        std::os::unix::fs::symlink(outside.join("b"), root.join("a/b")).unwrap();
        let err = locate(&root, root_fd, &entry("a/b/f"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "refusing to follow the symbolic link at {}",
                root.join("a/b").display()
            )),
            "{err}"
        );
        // The descriptor resolved before the swap still names the moved directory.
        assert!(lstat_at(&dir.fd, "marker").is_ok());
    }
}
