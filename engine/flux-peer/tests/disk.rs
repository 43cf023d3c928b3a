//! The receiver's disk rules against a hostile manifest, on real files in a temporary
//! directory: what a sender may and may not do to the destination.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flux_peer::disk::{Destination, ModePolicy, process_umask, received_mode};
use flux_transfer::digest::chunk_hash;
use flux_transfer::{DiskOp, DiskResult, Manifest, OpId};
use flux_wire::{Entry, EntryKind, Timestamp};

const CHUNK: u32 = 64 << 10;

fn entry(path: &str, kind: EntryKind, size: u64, mode: u32) -> Entry {
    Entry {
        path: path.into(),
        kind,
        size,
        // 2001-09-09: far from now, so a re-timed directory shows.
        mtime: Timestamp {
            secs: 1_000_000_000,
            nanos: 0,
        },
        mode,
        link_target: String::new(),
    }
}

/// Puts every entry of `entries` in place under `root` as a receiver would (files get
/// `contents`), then finishes; returns the first failure.
fn receive(root: &Path, entries: Vec<Entry>, policy: ModePolicy) -> Result<(), String> {
    receive_with(root, entries, policy, None, || {})
}

/// [`receive`], with `hook` called each time an entry's parent directory has been resolved
/// (see `Destination::set_resolved_hook`) and `before_finish` run just before the last step.
fn receive_with(
    root: &Path,
    entries: Vec<Entry>,
    policy: ModePolicy,
    hook: Option<fn(&Path)>,
    before_finish: impl FnOnce(),
) -> Result<(), String> {
    let m = Arc::new(Manifest::new(entries, CHUNK).map_err(|e| e.to_string())?);
    let mut d = Destination::with_modes(root.to_path_buf(), m.clone(), policy);
    if let Some(hook) = hook {
        d.set_resolved_hook(hook);
    }
    let mut id = 0;
    let mut next = || {
        id += 1;
        OpId(id)
    };
    let run = |d: &mut Destination, op: DiskOp| match d.execute(op).1 {
        Ok(DiskResult::Done) => Ok(()),
        Ok(other) => Err(format!("unexpected result {other:?}")),
        Err(e) => Err(e.to_string()),
    };
    for (i, e) in m.entries().iter().enumerate() {
        let file = i as u32;
        if e.kind == EntryKind::File && e.size > 0 {
            let data = vec![b'x'; e.size as usize];
            let op = DiskOp::WriteChunk {
                id: next(),
                file,
                index: 0,
                offset: 0,
                hash: chunk_hash(&data),
                data: data.into(),
                compressed: None,
            };
            run(&mut d, op)?;
        }
        let op = DiskOp::Finalize {
            id: next(),
            file,
            replace: false,
            size: None,
        };
        run(&mut d, op)?;
    }
    before_finish();
    run(&mut d, DiskOp::Finish { id: next() })
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// A share naming a directory the receiver already has (`.ssh` with `--out ~`) must not
/// re-permission or re-time it: it keeps 0700 and its mtime, even though the sender said 0777.
#[test]
fn existing_directory_keeps_its_mode_and_times() {
    let tmp = tempfile::tempdir().unwrap();
    let ssh = tmp.path().join(".ssh");
    fs::create_dir(&ssh).unwrap();
    fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700)).unwrap();
    let before = SystemTime::now() - Duration::from_secs(3600);
    fs::File::open(&ssh).unwrap().set_modified(before).unwrap();

    receive(
        tmp.path(),
        vec![
            entry(".ssh", EntryKind::Dir, 0, 0o777),
            entry(".ssh/new", EntryKind::Dir, 0, 0o777),
            entry(".ssh/new/f", EntryKind::File, 3, 0o644),
        ],
        ModePolicy::Keep,
    )
    .unwrap();

    assert_eq!(
        mode(&ssh),
        0o700,
        "an existing directory was re-permissioned"
    );
    // Creating `new` inside touches it (now); the sender's time must not be applied.
    assert!(
        fs::metadata(&ssh).unwrap().modified().unwrap() >= before,
        "an existing directory was re-timed to the sender's value"
    );
    // The directory this transfer created does take the sender's values (0777 kept here).
    assert_eq!(mode(&ssh.join("new")), 0o777);
    assert_eq!(
        fs::metadata(ssh.join("new"))
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        1_000_000_000
    );
}

/// By default received modes never carry setuid/setgid/sticky bits, nor group or world write,
/// and the receiver's umask applies; `--keep-modes` keeps the rwx bits but still no special
/// bits.
#[test]
fn received_modes_are_tamed_unless_kept() {
    let umask = process_umask();
    let tmp = tempfile::tempdir().unwrap();
    let safe = tmp.path().join("safe");
    fs::create_dir(&safe).unwrap();
    let shared = || {
        vec![
            entry("d", EntryKind::Dir, 0, 0o7777),
            entry("d/suid", EntryKind::File, 3, 0o4777),
            entry("d/sgid", EntryKind::File, 0, 0o2666),
            entry("plain", EntryKind::File, 1, 0o640),
        ]
    };
    receive(&safe, shared(), ModePolicy::Safe).unwrap();
    for (p, sent) in [("d/suid", 0o4777), ("d/sgid", 0o2666), ("plain", 0o640)] {
        let got = mode(&safe.join(p));
        assert_eq!(got & 0o7000, 0, "{p}: special bits {got:o}");
        assert_eq!(got & 0o022, 0, "{p}: group/world writable {got:o}");
        assert_eq!(
            got & umask,
            0,
            "{p}: umask {umask:o} not applied to {got:o}"
        );
        assert_eq!(got, sent & 0o777 & !umask & !0o022, "{p}");
    }
    let d = mode(&safe.join("d"));
    assert_eq!(d & 0o7022, 0, "directory: {d:o}");

    let kept = tmp.path().join("kept");
    fs::create_dir(&kept).unwrap();
    receive(&kept, shared(), ModePolicy::Keep).unwrap();
    assert_eq!(mode(&kept.join("d/suid")), 0o777);
    assert_eq!(mode(&kept.join("d/sgid")), 0o666);
    assert_eq!(mode(&kept.join("d")), 0o777);
}

#[test]
fn mode_rule() {
    assert_eq!(received_mode(0o4755, 0o022, ModePolicy::Safe), 0o755);
    assert_eq!(received_mode(0o777, 0o077, ModePolicy::Safe), 0o700);
    assert_eq!(received_mode(0o666, 0o002, ModePolicy::Safe), 0o644);
    assert_eq!(received_mode(0o7777, 0o077, ModePolicy::Keep), 0o777);
}

fn link(path: &str, target: &str) -> Entry {
    Entry {
        link_target: target.into(),
        ..entry(path, EntryKind::Symlink, 0, 0o777)
    }
}

/// Issue 13's reproduction: `l1` climbs ten levels from `a1/…/a10` (inside), and `notes.txt`
/// passes through `l1` and climbs eleven more (lexically inside, really `/etc/passwd`). The
/// share must be refused, naming the link and its target; before the fix it was laid out and
/// `notes.txt` resolved outside the destination.
#[test]
fn link_chain_cannot_reach_outside_the_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let l1 = "a1/a2/a3/a4/a5/a6/a7/a8/a9/a10/l1";
    let target = format!("{l1}/{}/etc/passwd", [".."; 11].join("/"));
    let entries = vec![link(l1, &[".."; 10].join("/")), link("notes.txt", &target)];
    match receive(&out, entries, ModePolicy::Safe) {
        Err(e) => {
            assert!(e.contains("notes.txt"), "{e}");
            assert!(e.contains(&target), "{e}");
        }
        Ok(()) => panic!(
            "the chain was laid out: notes.txt resolves to {:?}",
            fs::canonicalize(out.join("notes.txt"))
        ),
    }
    assert!(fs::symlink_metadata(out.join("notes.txt")).is_err());
}

/// A link of the share must not lead through a link the receiver already has under `--out`
/// (here `outside -> /etc`): the manifest cannot see it, the receiver can.
#[test]
fn link_through_an_existing_link_under_the_destination_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink("/etc", out.join("outside")).unwrap();
    let err = receive(
        &out,
        vec![link("notes.txt", "outside/passwd")],
        ModePolicy::Safe,
    );
    match err {
        Err(e) => {
            assert!(e.contains("notes.txt -> outside/passwd"), "{e}");
            assert!(e.contains("outside"), "{e}");
        }
        Ok(()) => panic!(
            "notes.txt resolves to {:?}",
            fs::canonicalize(out.join("notes.txt"))
        ),
    }
    // Links of the share itself, pointing at each other's last component, are fine.
    let ok = tmp.path().join("ok");
    fs::create_dir(&ok).unwrap();
    receive(
        &ok,
        vec![
            link("b", "a"),
            entry("d", EntryKind::Dir, 0, 0o755),
            link("a", "d"),
            link("d/c", "../b"),
        ],
        ModePolicy::Safe,
    )
    .unwrap();
}

/// A local user who can write in `--out` plants the partial file (or its sidecar) as a hard
/// link to a file of the receiving user's: the receiver must refuse to write through it, and
/// the victim must keep its bytes.
#[test]
fn hard_linked_partial_files_are_not_written_through() {
    for planted in [".f.thrupart", ".f.thrupart.state"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        fs::create_dir(&out).unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, "precious bytes").unwrap();
        fs::hard_link(&victim, out.join(planted)).unwrap();
        // Only a file of more than one chunk keeps a sidecar.
        let size = if planted.ends_with(".state") {
            u64::from(CHUNK) + 3
        } else {
            3
        };
        let res = receive(
            &out,
            vec![entry("f", EntryKind::File, size, 0o644)],
            ModePolicy::Safe,
        );
        assert_eq!(
            fs::read_to_string(&victim).unwrap(),
            "precious bytes",
            "{planted}: written through a hard link"
        );
        let e = res.expect_err(planted);
        assert!(e.contains(planted), "{planted}: {e}");
        assert!(e.contains("link"), "{planted}: {e}");
    }
}

/// What a local attacker does mid-transfer: the real `out/sub` is moved aside to
/// `out/sub.moved` and `out/sub` becomes a symbolic link to `outside/sub` (beside `out`), a
/// directory only the receiving user can write. Done once, the first time `dir` is the real
/// `sub`.
fn swap_to_outside(dir: &Path) {
    if dir.file_name().is_none_or(|n| n != "sub") || !fs::symlink_metadata(dir).unwrap().is_dir() {
        return;
    }
    let tmp = dir.parent().unwrap().parent().unwrap();
    fs::rename(dir, dir.with_file_name("sub.moved")).unwrap();
    std::os::unix::fs::symlink(tmp.join("outside/sub"), dir).unwrap();
}

/// Every entry under `dir`, with its mode and mtime, following no link.
fn snapshot(dir: &Path) -> Vec<(String, u32, i64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                todo.push(p.clone());
            }
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            out.push((rel, md.mode(), md.mtime()));
        }
    }
    out.sort();
    out
}

/// Issue 13 item 13: a local user who can write in `--out` swaps a directory of the transfer
/// for a symbolic link to a directory outside it while the transfer runs. No create (partial
/// file, sidecar, directory), final rename/link, chmod or utimes may land outside `--out`; the
/// transfer stops with an error naming the path. The swap happens right after the parent
/// directory was checked (the seam), or, for `finish()`, after every entry was placed.
#[test]
fn swapped_directory_cannot_redirect_writes_outside_the_destination() {
    let dir = |p: &str| entry(p, EntryKind::Dir, 0, 0o777);
    let file = |p: &str, size| entry(p, EntryKind::File, size, 0o777);
    // (case, entries, swap at the seam (else before finish()), what the error must contain)
    let cases: Vec<(&str, Vec<Entry>, bool, &str)> = vec![
        // The partial file and its sidecar are created after the swap.
        (
            "create",
            vec![dir("sub"), file("sub/f", 3)],
            true,
            "out/sub",
        ),
        // An empty file is created and linked to its final name after the swap.
        ("place", vec![dir("sub"), file("sub/empty", 0)], true, "sub"),
        // A directory of the share is made after the swap.
        ("mkdir", vec![dir("sub"), dir("sub/new")], true, "out/sub"),
        // finish() chmods and re-times `sub/inner`, which it created, after the swap.
        (
            "finish",
            vec![dir("sub"), dir("sub/inner"), file("sub/inner/f", 3)],
            false,
            "sub/inner",
        ),
    ];
    for (case, entries, at_seam, named) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        fs::create_dir(&out).unwrap();
        let inner = tmp.path().join("outside/sub/inner");
        fs::create_dir_all(&inner).unwrap();
        fs::set_permissions(&inner, fs::Permissions::from_mode(0o700)).unwrap();
        let before = snapshot(&tmp.path().join("outside"));

        let sub = out.join("sub");
        let res = if at_seam {
            receive_with(
                &out,
                entries,
                ModePolicy::Keep,
                Some(swap_to_outside),
                || {},
            )
        } else {
            receive_with(&out, entries, ModePolicy::Keep, None, || {
                swap_to_outside(&sub)
            })
        };

        assert!(
            fs::symlink_metadata(&sub).unwrap().is_symlink(),
            "{case}: the swap did not happen"
        );
        assert_eq!(
            snapshot(&tmp.path().join("outside")),
            before,
            "{case}: something outside --out was created, renamed or changed"
        );
        let e = res.expect_err(case);
        assert!(e.contains(named), "{case}: {e}");
        if case == "place" {
            // The verified file reached its name in the directory the transfer made.
            assert!(out.join("sub.moved/empty").is_file(), "{case}");
        }
    }
}

/// With durability asked for, files and directories are synced on the way (the time it took
/// is reported); without, nothing is synced.
#[test]
fn a_durable_destination_syncs_and_reports_the_time() {
    for durable in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let m = Arc::new(
            Manifest::new(
                vec![
                    entry("d", EntryKind::Dir, 0, 0o755),
                    entry("d/f", EntryKind::File, 5, 0o644),
                ],
                CHUNK,
            )
            .unwrap(),
        );
        let mut d = Destination::new(tmp.path().to_path_buf(), m);
        d.set_durable(durable);
        let data = b"bytes".to_vec();
        let ops = [
            DiskOp::Finalize {
                id: OpId(1),
                file: 0,
                replace: false,
                size: None,
            },
            DiskOp::WriteChunk {
                id: OpId(2),
                file: 1,
                index: 0,
                offset: 0,
                hash: chunk_hash(&data),
                data: data.clone().into(),
                compressed: None,
            },
            DiskOp::Finalize {
                id: OpId(3),
                file: 1,
                replace: false,
                size: None,
            },
            DiskOp::Finish { id: OpId(4) },
        ];
        for op in ops {
            d.execute(op).1.unwrap();
        }
        assert_eq!(fs::read(tmp.path().join("d/f")).unwrap(), data);
        assert_eq!(
            d.sync_time() > Duration::ZERO,
            durable,
            "durable: {durable}"
        );
    }
}

/// Bytes that do not match their hash are refused before anything is written.
#[test]
fn a_chunk_that_does_not_match_its_hash_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let m = Arc::new(Manifest::new(vec![entry("f", EntryKind::File, 5, 0o644)], CHUNK).unwrap());
    let mut d = Destination::new(tmp.path().to_path_buf(), m);
    let res = d
        .execute(DiskOp::WriteChunk {
            id: OpId(1),
            file: 0,
            index: 0,
            offset: 0,
            hash: chunk_hash(b"other"),
            data: b"bytes".to_vec().into(),
            compressed: None,
        })
        .1;
    assert_eq!(res.unwrap_err(), flux_transfer::DiskFailure::Corrupt);
    let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
    assert!(names.is_empty(), "something was created: {names:?}");
}

/// The user's answers for clashing files: a skipped file is never written and what is here
/// stays; a renamed one lands beside it; a replaced one takes its place; a new name must be
/// one plain name.
#[test]
fn answered_clashes_skip_rename_or_replace() {
    use flux_peer::disk::Resolutions;
    type Answer = fn(&mut Resolutions);
    let cases: [(&str, Answer); 3] = [
        ("skip", |r| {
            r.skip.insert(0);
        }),
        ("rename", |r| {
            r.rename.insert(0, "f (1).txt".into());
        }),
        ("replace", |r| {
            r.replace.insert(0);
        }),
    ];
    for (what, answer) in cases {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("f.txt"), b"mine").unwrap();
        let m = Arc::new(
            Manifest::new(vec![entry("f.txt", EntryKind::File, 3, 0o644)], CHUNK).unwrap(),
        );
        let mut d = Destination::new(tmp.path().to_path_buf(), m);
        let mut r = Resolutions::default();
        answer(&mut r);
        d.set_resolutions(r);
        let data = b"new".to_vec();
        d.execute(DiskOp::WriteChunk {
            id: OpId(1),
            file: 0,
            index: 0,
            offset: 0,
            hash: chunk_hash(&data),
            data: data.into(),
            compressed: None,
        })
        .1
        .unwrap();
        d.execute(DiskOp::Finalize {
            id: OpId(2),
            file: 0,
            replace: false,
            size: None,
        })
        .1
        .unwrap();
        let mut names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let here = fs::read(tmp.path().join("f.txt")).unwrap();
        match what {
            "skip" => {
                assert_eq!(names, ["f.txt"], "{what}");
                assert_eq!(here, b"mine");
            }
            "rename" => {
                assert_eq!(names, ["f (1).txt", "f.txt"], "{what}");
                assert_eq!(here, b"mine");
                assert_eq!(fs::read(tmp.path().join("f (1).txt")).unwrap(), b"new");
            }
            _ => {
                assert_eq!(names, ["f.txt"], "{what}");
                assert_eq!(here, b"new");
            }
        }
    }
    // A new name that is a path is refused, naming it.
    let tmp = tempfile::tempdir().unwrap();
    let m =
        Arc::new(Manifest::new(vec![entry("f.txt", EntryKind::File, 0, 0o644)], CHUNK).unwrap());
    let mut d = Destination::new(tmp.path().to_path_buf(), m);
    let mut r = Resolutions::default();
    r.rename.insert(0, "../escape".into());
    d.set_resolutions(r);
    let err = d
        .execute(DiskOp::Finalize {
            id: OpId(1),
            file: 0,
            replace: false,
            size: None,
        })
        .1
        .unwrap_err();
    assert!(err.to_string().contains("../escape"), "{err}");
    assert!(!tmp.path().parent().unwrap().join("escape").exists());
}
