//! Recording the job's files at a checkpoint (see the module docs of
//! [`crate::files`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::stat::{FileStat, SFlag};

use super::resolve::{self, Walk, WalkError};
use super::{
    classify, excluded, fingerprints, io_err, opened_for_writing, CaptureSummary, DirId,
    FileRecord, FileState, FilesConfig, FilesError, Mode, Opened, BLOB_PREFIX, STATE_FILE,
    STATE_VERSION,
};

/// Why a path cannot be recorded, for `skipped`.
fn walk_reason(e: &WalkError) -> String {
    match e {
        WalkError::BadPath(why) => format!("not resolvable without guessing: {why}"),
        WalkError::Symlink(at) => format!(
            "{} is a symlink; supervise does not follow symlinks (list the real path)",
            at.display()
        ),
        WalkError::NotADirectory(at) => format!("{} is not a directory", at.display()),
        WalkError::Replaced(at) => format!("{} changed while being recorded", at.display()),
        WalkError::Io(at, e) => format!("{}: {e}", at.display()),
    }
}

/// The file at `path`, reached without following any symlink: the (dev,
/// ino) of every directory from `/` to its parent, and the file opened for
/// reading (`O_NOFOLLOW|O_NONBLOCK|O_NOCTTY`) with its stat. `Ok(Err(..))`
/// says why it cannot be recorded; `Ok(Ok(None))` that it does not exist
/// (with the identities of the directories that do).
type Found = Result<(Vec<DirId>, Option<(File, FileStat)>), String>;

fn find(path: &Path) -> Result<Found, FilesError> {
    let (fd, dirs) = match resolve::open_parent(path, &[]) {
        Ok(Walk::Parent(fd, dirs)) => (fd, dirs),
        Ok(Walk::Missing(_, dirs)) => return Ok(Ok((dirs, None))),
        Err(WalkError::Io(at, e)) => return Err(io_err(&at, "open directory")(e)),
        Err(e) => return Ok(Err(walk_reason(&e))),
    };
    let (_, name) = resolve::split(path).map_err(|_| FilesError::Malformed {
        path: path.into(),
        reason: "unsplittable path".into(),
    })?;
    // Look before opening: a FIFO, device or symlink is never opened.
    match resolve::lstat_at(&fd, name) {
        Ok(None) => return Ok(Ok((dirs, None))),
        Ok(Some(st)) if resolve::kind(&st) == SFlag::S_IFLNK => {
            return Ok(Err(format!(
                "{} is a symlink; supervise does not follow symlinks (list the real path)",
                path.display()
            )))
        }
        Ok(Some(st)) if resolve::kind(&st) != SFlag::S_IFREG => {
            return Ok(Err("not a regular file".into()))
        }
        Ok(Some(_)) => {}
        Err(e) => return Err(io_err(path, "stat")(e.into())),
    }
    match resolve::open_file(&fd, name, false) {
        Ok((f, st)) if resolve::kind(&st) == SFlag::S_IFREG => Ok(Ok((dirs, Some((f, st))))),
        Ok(_) | Err(Errno::ELOOP | Errno::ENOENT) => Ok(Err("changed while being recorded".into())),
        Err(e) => Err(io_err(path, "open")(e.into())),
    }
}

/// `fd/N` or `map_files/RANGE` of a `/proc/PID/...` handle of `pid`.
fn holder_entry(handle: &Path, pid: i32) -> Option<String> {
    let rel = handle.strip_prefix(format!("/proc/{pid}")).ok()?;
    Some(rel.to_str()?.to_string())
}

/// Records the files of the process tree `pids` into `out_dir` (the
/// checkpoint's staging directory). Call while the tree is frozen.
/// `ignore` lists supervise's own directories (image store, state dir).
pub fn capture(
    pids: &[i32],
    cfg: &FilesConfig,
    ignore: &[PathBuf],
    out_dir: &Path,
) -> Result<CaptureSummary, FilesError> {
    let start = Instant::now();
    // (dev, ino) -> (opened, mode, why)
    let mut found: BTreeMap<(u64, u64), (Opened, Mode, String)> = BTreeMap::new();
    // (dev, ino) -> every (pid in the job's namespace, /proc entry) holding it
    let mut holders: BTreeMap<(u64, u64), Vec<(i32, String)>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for &pid in pids {
        let ns_pid = crate::proc::ns_pid(pid).unwrap_or(pid);
        let opened = match opened_for_writing(pid) {
            Ok(v) => v,
            // The process vanished (it cannot while frozen; attached trees
            // may have short-lived members): nothing of it to record.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(Path::new(&format!("/proc/{pid}/fd")), "list")(e)),
        };
        for o in opened {
            if excluded(&o.path, cfg, ignore) {
                continue;
            }
            let (mut mode, mut why) = classify(&o);
            if cfg.append.iter().any(|p| p == &o.path) {
                (mode, why) = (Mode::Extend, "listed in files.append");
            } else if cfg.snapshot.iter().any(|p| p == &o.path) {
                (mode, why) = (Mode::Snapshot, "listed in files.snapshot");
            }
            let key = (o.dev, o.ino);
            if let Some(rel) = holder_entry(&o.handle, pid) {
                holders.entry(key).or_default().push((ns_pid, rel));
            }
            if let Some(prev) = found.get_mut(&key) {
                if prev.1 == Mode::Extend && mode == Mode::Snapshot {
                    prev.1 = mode;
                    prev.2 = why.to_string();
                }
                continue;
            }
            // The job sees its mount namespace; supervise must reach the
            // same inode by the same path, without following a symlink, or
            // a rollback could hit another. (Checked again when opened
            // below; this keeps a second path to the same inode usable.)
            match find(&o.path)? {
                Ok((_, Some((_, st)))) if st.st_dev == o.dev && st.st_ino == o.ino => {}
                Ok(_) => {
                    skipped.push((
                        o.path.clone(),
                        "not the same file at this path outside the job's namespace".into(),
                    ));
                    continue;
                }
                Err(why) => {
                    skipped.push((o.path.clone(), why));
                    continue;
                }
            }
            found.insert(key, (o, mode, why.to_string()));
        }
    }

    let mut records = Vec::new();
    let mut summary = CaptureSummary::default();
    let mut n_blob = 0usize;
    let mut take_blob = |src: &mut File, src_path: &Path| -> Result<(String, u64), FilesError> {
        n_blob += 1;
        let name = format!("{BLOB_PREFIX}{n_blob:04}");
        let dst_path = out_dir.join(&name);
        let mut dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&dst_path)
            .map_err(io_err(&dst_path, "create"))?;
        src.seek(SeekFrom::Start(0))
            .map_err(io_err(src_path, "seek"))?;
        let n = io::copy(src, &mut dst).map_err(io_err(src_path, "copy"))?;
        Ok((name, n))
    };
    let record = |path: &Path, mode, why: String, dirs, st: Option<&FileStat>| FileRecord {
        path: path.to_path_buf(),
        mode,
        why,
        size: st.map_or(0, |s| s.st_size as u64),
        dev: st.map_or(0, |s| s.st_dev),
        ino: st.map_or(0, |s| s.st_ino),
        perm: st.map_or(0, |s| s.st_mode & 0o7777),
        listed: cfg.snapshot.iter().any(|p| p == path),
        head: None,
        tail: None,
        blob: None,
        dirs,
        uid: st.map(|s| s.st_uid),
        gid: st.map(|s| s.st_gid),
        holders: Vec::new(),
    };

    for (_, (o, mode, why)) in found {
        // Opened anew through the directories just checked: the content
        // recorded is that of the file at this path, and the identities
        // recorded are those a rollback will insist on.
        let (dirs, mut f, st) = match find(&o.path)? {
            Ok((dirs, Some((f, st)))) if st.st_dev == o.dev && st.st_ino == o.ino => (dirs, f, st),
            Ok(_) => {
                skipped.push((o.path.clone(), "changed while being recorded".into()));
                continue;
            }
            Err(why) => {
                skipped.push((o.path.clone(), why));
                continue;
            }
        };
        let mut rec = record(&o.path, mode, why, dirs, Some(&st));
        rec.holders = holders.remove(&(o.dev, o.ino)).unwrap_or_default();
        match mode {
            Mode::Extend => {
                let (h, t) = fingerprints(&f, rec.size, &o.path)?;
                rec.head = Some(h);
                rec.tail = Some(t);
            }
            _ => {
                let (name, n) = take_blob(&mut f, &o.path)?;
                rec.size = n;
                rec.blob = Some(name);
                summary.snapshots += 1;
                summary.bytes_copied += n;
            }
        }
        records.push(rec);
    }

    // Listed paths the job does not hold open right now.
    for p in &cfg.snapshot {
        if records.iter().any(|r| &r.path == p)
            || skipped.iter().any(|(s, _)| s == p)
            || excluded(p, cfg, ignore)
        {
            continue;
        }
        match find(p)? {
            Ok((dirs, Some((mut f, st)))) => {
                let (name, n) = take_blob(&mut f, p)?;
                summary.snapshots += 1;
                summary.bytes_copied += n;
                let mut rec = record(
                    p,
                    Mode::Snapshot,
                    "listed in files.snapshot".into(),
                    dirs,
                    Some(&st),
                );
                rec.size = n;
                rec.blob = Some(name);
                records.push(rec);
            }
            Ok((dirs, None)) => records.push(record(
                p,
                Mode::Absent,
                "listed in files.snapshot; absent at the checkpoint".into(),
                dirs,
                None,
            )),
            Err(why) => skipped.push((p.clone(), format!("listed in files.snapshot but {why}"))),
        }
    }

    records.sort_by(|a, b| a.path.cmp(&b.path));
    summary.files = records.len();
    let state = FileState {
        version: STATE_VERSION,
        files: records,
        skipped,
    };
    let path = out_dir.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(&state).map_err(|e| FilesError::Malformed {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io_err(&path, "create"))?;
    f.write_all(&json).map_err(io_err(&path, "write"))?;
    summary.elapsed = start.elapsed();
    Ok(summary)
}
