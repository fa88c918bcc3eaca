//! The job's own files: recorded with each checkpoint, rolled back before
//! each restore, so that a restored job's files match its memory and its
//! output is written exactly once.
//!
//! CRIU restores a process's memory and file offsets, not file contents, and
//! refuses to restore a job whose open regular file changed size since the
//! dump ("has bad size"). supervise therefore records, at the moment of the
//! checkpoint, the state of every regular file the job has open for writing
//! (and of every shared writable file mapping), and puts those files back to
//! that state before CRIU restores the process.
//!
//! # When
//! [`capture`] runs from CRIU's `post-dump` notification, while the whole
//! process tree is still frozen, so the recorded file state and the dumped
//! memory belong to the same instant. Its output (`supervise-files.json` and
//! `supervise-file-*` blobs) is written into the checkpoint's staging
//! directory and published, verified and retained together with CRIU's own
//! image files. [`rollback`] runs after the image verified and before CRIU is
//! asked to restore.
//!
//! # How much is kept (decided per file, from what is observable)
//! * **extend** — the job only appends: opened with `O_APPEND`, or opened
//!   write-only with its offset at the end of the file, or listed in
//!   `[files] append`. Only the size is kept (plus hashes of the first and
//!   last 4 KiB before that size); a rollback truncates the file back to it.
//!   Costs no copy however large the file.
//! * **snapshot** — the job may rewrite the file in place: opened read-write
//!   (without `O_APPEND`), write-only with its offset before the end, mapped
//!   shared and writable, or listed in `[files] snapshot`. The full content is
//!   copied (by `copy_file_range`, which reflinks where the file system can);
//!   a rollback writes it back.
//! * **absent** — a path listed in `[files] snapshot` that did not exist at
//!   the checkpoint; a rollback removes it.
//!
//! Files opened read-only, files the job did not have open, anything under
//! `/proc`, `/sys` and `/dev`, unlinked files (CRIU keeps those itself),
//! supervise's image store and paths listed in `[files] exclude` are never
//! recorded nor touched.
//!
//! # Safety of a rollback
//! Every recorded file is checked before any is changed. A rollback refuses
//! (and the image counts as unusable, so the supervisor falls back to an
//! older one, then to a fresh start) when an *extend* file was deleted,
//! replaced by another file (other inode), truncated below its checkpoint
//! size, or had bytes before that size changed (head/tail hashes), and when
//! an open *snapshot* file was replaced by another file. It never guesses.
//! An open *snapshot* file that was deleted is recreated from its copy;
//! files listed in `[files] snapshot` are put back by path (write to a
//! temporary file, rename), as jobs often replace them atomically themselves.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::FilesConfig;

/// Name of the file-state record inside a checkpoint.
pub const STATE_FILE: &str = "supervise-files.json";
/// Prefix of the content copies inside a checkpoint.
pub const BLOB_PREFIX: &str = "supervise-file-";
/// Format version of [`STATE_FILE`].
pub const STATE_VERSION: u32 = 1;
/// Bytes hashed at the head and at the tail of an *extend* file.
pub const FINGERPRINT_BYTES: u64 = 4096;

/// Errors recording or rolling back the job's files.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// An OS call failed on a file.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A file cannot be put back to its checkpoint state without guessing.
    #[error("cannot roll back {path}: {reason}")]
    Conflict {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The recorded file state is unreadable.
    #[error("{path}: malformed file state: {reason}")]
    Malformed {
        /// The state file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> FilesError {
    let path = path.to_path_buf();
    move |source| FilesError::Io { path, what, source }
}

/// How a file is rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Truncate back to the recorded size.
    Extend,
    /// Write the recorded content back.
    Snapshot,
    /// Remove (a listed path that did not exist at the checkpoint).
    Absent,
}

/// One recorded file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Absolute path.
    pub path: PathBuf,
    /// How it is rolled back.
    pub mode: Mode,
    /// Why that mode was chosen (for logs and `supervise images`).
    pub why: String,
    /// Size at the checkpoint.
    pub size: u64,
    /// Device and inode at the checkpoint (0 for [`Mode::Absent`]).
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Permission bits at the checkpoint.
    pub perm: u32,
    /// Listed in `[files] snapshot` (put back by path, whatever its inode).
    #[serde(default)]
    pub listed: bool,
    /// SHA-256 of the first `min(size, 4 KiB)` bytes (extend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// SHA-256 of the last `min(size, 4 KiB)` bytes before `size` (extend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<String>,
    /// Name of the content copy in the checkpoint (snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
}

/// Contents of [`STATE_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Recorded files, sorted by path.
    pub files: Vec<FileRecord>,
    /// Files seen open for writing but not recorded, with the reason.
    #[serde(default)]
    pub skipped: Vec<(PathBuf, String)>,
}

/// What [`capture`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureSummary {
    /// Files recorded.
    pub files: usize,
    /// Of which content copies.
    pub snapshots: usize,
    /// Bytes copied.
    pub bytes_copied: u64,
    /// Time spent (inside the job's freeze).
    pub elapsed: Duration,
}

/// One way the job holds a file open for writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// Path as the kernel reports it.
    pub path: PathBuf,
    /// `/proc/PID/fd/N` or `/proc/PID/map_files/...`: opens the very inode.
    pub handle: PathBuf,
    /// `open(2)` flags from fdinfo (None for a mapping).
    pub flags: Option<i32>,
    /// File offset from fdinfo.
    pub pos: u64,
    /// Device and inode (from stat of the handle).
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size at the moment.
    pub size: u64,
}

/// `flags:` and `pos:` of a `/proc/PID/fdinfo/N` text.
pub fn parse_fdinfo(text: &str) -> Option<(i32, u64)> {
    let mut flags = None;
    let mut pos = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("flags:") {
            flags = i32::from_str_radix(v.trim(), 8).ok();
        } else if let Some(v) = line.strip_prefix("pos:") {
            pos = v.trim().parse().ok();
        }
    }
    Some((flags?, pos?))
}

/// The mode a single open (or mapping) implies, with the reason.
pub fn classify(o: &Opened) -> (Mode, &'static str) {
    match o.flags {
        None => (Mode::Snapshot, "mapped shared and writable"),
        Some(f) if f & libc::O_APPEND != 0 => (Mode::Extend, "opened with O_APPEND"),
        Some(f) if f & libc::O_ACCMODE == libc::O_WRONLY && o.pos >= o.size => (
            Mode::Extend,
            "written sequentially (write-only, offset at end)",
        ),
        Some(f) if f & libc::O_ACCMODE == libc::O_WRONLY => {
            (Mode::Snapshot, "write-only with offset before the end")
        }
        Some(_) => (Mode::Snapshot, "opened read-write"),
    }
}

/// True if `path` is `p` or lies under directory `p`.
fn under(path: &Path, p: &Path) -> bool {
    path.starts_with(p)
}

/// Paths never recorded: pseudo file systems, the config's excludes and
/// `ignore` (supervise's own directories).
fn excluded(path: &Path, cfg: &FilesConfig, ignore: &[PathBuf]) -> bool {
    ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| under(path, Path::new(p)))
        || cfg.exclude.iter().any(|p| under(path, p))
        || ignore.iter().any(|p| under(path, p))
}

/// Regular files `pid` holds open for writing, and its shared writable file
/// mappings. Unlinked files and non-files are left out.
pub fn opened_for_writing(pid: i32) -> io::Result<Vec<Opened>> {
    let mut out = Vec::new();
    let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
    for entry in fs::read_dir(&fd_dir)? {
        let Ok(entry) = entry else { continue };
        let handle = entry.path();
        let Ok(target) = fs::read_link(&handle) else {
            continue; // closed meanwhile
        };
        let Some(path) = real_path(&target) else {
            continue;
        };
        let name = entry.file_name();
        let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", name.to_string_lossy()))
        else {
            continue;
        };
        let Some((flags, pos)) = parse_fdinfo(&info) else {
            continue;
        };
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            continue;
        }
        out.extend(linked_file(path, handle, Some(flags), pos));
    }
    // Shared writable file mappings: "addr perms offset dev inode path".
    if let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) {
        for line in maps.lines() {
            let mut it = line.splitn(6, ' ');
            let (Some(range), Some(perms)) = (it.next(), it.next()) else {
                continue;
            };
            let path = it.nth(3).map(str::trim_start).unwrap_or("");
            let p = perms.as_bytes();
            if p.len() < 4 || p[1] != b'w' || p[3] != b's' {
                continue;
            }
            let Some(path) = real_path(Path::new(path)) else {
                continue;
            };
            let handle = PathBuf::from(format!("/proc/{pid}/map_files/{range}"));
            out.extend(linked_file(path, handle, None, 0));
        }
    }
    Ok(out)
}

/// An [`Opened`] for `handle` if it is a regular file that still has a name.
fn linked_file(path: PathBuf, handle: PathBuf, flags: Option<i32>, pos: u64) -> Option<Opened> {
    let md = fs::metadata(&handle).ok()?;
    if !md.is_file() || md.nlink() == 0 {
        return None;
    }
    Some(Opened {
        path,
        handle,
        flags,
        pos,
        dev: md.dev(),
        ino: md.ino(),
        size: md.len(),
    })
}

/// An absolute path of a linked file, or None (pipes, sockets, anon inodes,
/// `(deleted)` files).
fn real_path(target: &Path) -> Option<PathBuf> {
    let s = target.to_str()?;
    if !s.starts_with('/') || s.ends_with(" (deleted)") {
        return None;
    }
    Some(PathBuf::from(s))
}

fn sha256_range(f: &mut File, start: u64, len: u64, path: &Path) -> Result<String, FilesError> {
    f.seek(SeekFrom::Start(start))
        .map_err(io_err(path, "seek"))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).map_err(io_err(path, "read"))?;
    Ok(hex::encode(Sha256::digest(&buf)))
}

/// (head, tail) fingerprints of the first `size` bytes of `f`.
fn fingerprints(f: &mut File, size: u64, path: &Path) -> Result<(String, String), FilesError> {
    let n = size.min(FINGERPRINT_BYTES);
    let head = sha256_range(f, 0, n, path)?;
    let tail = sha256_range(f, size - n, n, path)?;
    Ok((head, tail))
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
    // (dev, ino) -> (path, handle, mode, why)
    let mut found: BTreeMap<(u64, u64), (Opened, Mode, String)> = BTreeMap::new();
    let mut skipped = Vec::new();
    for &pid in pids {
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
            // The job sees its mount namespace; supervise must reach the
            // same inode by the same path, or a rollback could hit another.
            match fs::metadata(&o.path) {
                Ok(md) if md.dev() == o.dev && md.ino() == o.ino => {}
                _ => {
                    skipped.push((
                        o.path.clone(),
                        "not the same file at this path outside the job's namespace".into(),
                    ));
                    continue;
                }
            }
            let (mut mode, mut why) = classify(&o);
            if cfg.append.iter().any(|p| p == &o.path) {
                (mode, why) = (Mode::Extend, "listed in files.append");
            } else if cfg.snapshot.iter().any(|p| p == &o.path) {
                (mode, why) = (Mode::Snapshot, "listed in files.snapshot");
            }
            let key = (o.dev, o.ino);
            match found.get_mut(&key) {
                Some(prev) => {
                    if prev.1 == Mode::Extend && mode == Mode::Snapshot {
                        prev.1 = mode;
                        prev.2 = why.to_string();
                    }
                }
                None => {
                    found.insert(key, (o, mode, why.to_string()));
                }
            }
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
            .open(&dst_path)
            .map_err(io_err(&dst_path, "create"))?;
        src.seek(SeekFrom::Start(0))
            .map_err(io_err(src_path, "seek"))?;
        let n = io::copy(src, &mut dst).map_err(io_err(src_path, "copy"))?;
        Ok((name, n))
    };

    for (_, (o, mode, why)) in found {
        let mut f = File::open(&o.handle).map_err(io_err(&o.path, "open"))?;
        let md = f.metadata().map_err(io_err(&o.path, "stat"))?;
        let mut rec = FileRecord {
            path: o.path.clone(),
            mode,
            why,
            size: md.len(),
            dev: md.dev(),
            ino: md.ino(),
            perm: md.permissions().mode() & 0o7777,
            listed: cfg.snapshot.iter().any(|p| p == &o.path),
            head: None,
            tail: None,
            blob: None,
        };
        match mode {
            Mode::Extend => {
                let (h, t) = fingerprints(&mut f, rec.size, &o.path)?;
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
        if records.iter().any(|r| &r.path == p) || excluded(p, cfg, ignore) {
            continue;
        }
        match File::open(p) {
            Ok(mut f) => {
                let md = f.metadata().map_err(io_err(p, "stat"))?;
                if !md.is_file() {
                    skipped.push((
                        p.clone(),
                        "listed in files.snapshot but not a regular file".into(),
                    ));
                    continue;
                }
                let (name, n) = take_blob(&mut f, p)?;
                summary.snapshots += 1;
                summary.bytes_copied += n;
                records.push(FileRecord {
                    path: p.clone(),
                    mode: Mode::Snapshot,
                    why: "listed in files.snapshot".into(),
                    size: n,
                    dev: md.dev(),
                    ino: md.ino(),
                    perm: md.permissions().mode() & 0o7777,
                    listed: true,
                    head: None,
                    tail: None,
                    blob: Some(name),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => records.push(FileRecord {
                path: p.clone(),
                mode: Mode::Absent,
                why: "listed in files.snapshot; absent at the checkpoint".into(),
                size: 0,
                dev: 0,
                ino: 0,
                perm: 0,
                listed: true,
                head: None,
                tail: None,
                blob: None,
            }),
            Err(e) => return Err(io_err(p, "open")(e)),
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
        .open(&path)
        .map_err(io_err(&path, "create"))?;
    f.write_all(&json).map_err(io_err(&path, "write"))?;
    summary.elapsed = start.elapsed();
    Ok(summary)
}

/// Reads the file state of a checkpoint directory; `None` if it has none
/// (rollback was off, or the image predates it).
pub fn load(image_dir: &Path) -> Result<Option<FileState>, FilesError> {
    let path = image_dir.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path, "read")(e)),
    };
    let state: FileState = serde_json::from_slice(&bytes).map_err(|e| FilesError::Malformed {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if state.version != STATE_VERSION {
        return Err(FilesError::Malformed {
            path,
            reason: format!(
                "version {} (this supervise reads version {STATE_VERSION})",
                state.version
            ),
        });
    }
    for r in &state.files {
        let blob_ok = match (&r.mode, &r.blob) {
            (Mode::Snapshot, Some(b)) => {
                b.starts_with(BLOB_PREFIX) && !b.contains('/') && b != BLOB_PREFIX
            }
            (Mode::Snapshot, None) => false,
            (_, b) => b.is_none(),
        };
        if !r.path.is_absolute() || !blob_ok {
            return Err(FilesError::Malformed {
                path,
                reason: format!("bad record for {}", r.path.display()),
            });
        }
    }
    Ok(Some(state))
}

/// One step of a rollback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Already in its checkpoint state.
    Keep(PathBuf),
    /// Truncate to this size.
    Truncate(PathBuf, u64),
    /// Write the blob's content into the existing file (same inode).
    Rewrite(PathBuf, PathBuf),
    /// Create the file from the blob (it was deleted).
    Recreate(PathBuf, PathBuf, u32),
    /// Replace the path by the blob's content (temp file + rename).
    Replace(PathBuf, PathBuf, u32),
    /// Remove the path.
    Remove(PathBuf),
}

fn conflict(path: &Path, reason: impl Into<String>) -> FilesError {
    FilesError::Conflict {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Decides, without changing anything, how to put every recorded file
/// back; fails on the first file that cannot be put back safely.
pub fn plan(
    state: &FileState,
    image_dir: &Path,
    cfg: &FilesConfig,
) -> Result<Vec<Action>, FilesError> {
    let mut actions = Vec::new();
    for r in &state.files {
        if excluded(&r.path, cfg, &[]) {
            continue;
        }
        let p = &r.path;
        let now = match fs::symlink_metadata(p) {
            Ok(md) => Some(md),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(p, "stat")(e)),
        };
        let blob = || image_dir.join(r.blob.as_deref().unwrap_or_default());
        let same = |md: &fs::Metadata| md.is_file() && md.dev() == r.dev && md.ino() == r.ino;
        let action = match (r.mode, now) {
            (Mode::Absent, None) => Action::Keep(p.clone()),
            (Mode::Absent, Some(_)) => Action::Remove(p.clone()),
            (Mode::Snapshot, _) if r.listed => Action::Replace(p.clone(), blob(), r.perm),
            (Mode::Snapshot, None) => Action::Recreate(p.clone(), blob(), r.perm),
            (Mode::Snapshot, Some(md)) if same(&md) => Action::Rewrite(p.clone(), blob()),
            (Mode::Snapshot, Some(_)) => {
                return Err(conflict(
                    p,
                    "it was replaced by another file since the checkpoint (different inode); \
                     supervise does not overwrite it",
                ))
            }
            (Mode::Extend, None) => {
                return Err(conflict(
                    p,
                    format!(
                        "it was deleted since the checkpoint, and with it the {} bytes \
                         the job had written before the checkpoint",
                        r.size
                    ),
                ))
            }
            (Mode::Extend, Some(md)) if !same(&md) => {
                return Err(conflict(
                    p,
                    "it was replaced by another file since the checkpoint (different inode); \
                     supervise does not truncate it",
                ))
            }
            (Mode::Extend, Some(md)) if md.len() < r.size => {
                return Err(conflict(
                    p,
                    format!(
                        "it is shorter ({} bytes) than at the checkpoint ({} bytes): it was \
                         truncated since; list it in [files] snapshot if the job does that",
                        md.len(),
                        r.size
                    ),
                ))
            }
            (Mode::Extend, Some(md)) => {
                let mut f = File::open(p).map_err(io_err(p, "open"))?;
                let (h, t) = fingerprints(&mut f, r.size, p)?;
                if Some(&h) != r.head.as_ref() || Some(&t) != r.tail.as_ref() {
                    return Err(conflict(
                        p,
                        "bytes written before the checkpoint have changed since (rewritten in \
                         place?); list it in [files] snapshot so its content is kept",
                    ));
                }
                if md.len() == r.size {
                    Action::Keep(p.clone())
                } else {
                    Action::Truncate(p.clone(), r.size)
                }
            }
        };
        actions.push(action);
    }
    Ok(actions)
}

fn copy_blob(blob: &Path, dst: &mut File, dst_path: &Path) -> Result<u64, FilesError> {
    let mut src = File::open(blob).map_err(io_err(blob, "open"))?;
    dst.seek(SeekFrom::Start(0))
        .map_err(io_err(dst_path, "seek"))?;
    let n = io::copy(&mut src, dst).map_err(io_err(dst_path, "write"))?;
    dst.set_len(n).map_err(io_err(dst_path, "truncate"))?;
    dst.sync_all().map_err(io_err(dst_path, "fsync"))?;
    Ok(n)
}

/// Carries out a plan.
pub fn apply(actions: &[Action]) -> Result<(), FilesError> {
    for a in actions {
        match a {
            Action::Keep(_) => {}
            Action::Truncate(p, size) => {
                let f = OpenOptions::new()
                    .write(true)
                    .open(p)
                    .map_err(io_err(p, "open"))?;
                f.set_len(*size).map_err(io_err(p, "truncate"))?;
                f.sync_all().map_err(io_err(p, "fsync"))?;
            }
            Action::Rewrite(p, blob) => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .open(p)
                    .map_err(io_err(p, "open"))?;
                copy_blob(blob, &mut f, p)?;
            }
            Action::Recreate(p, blob, perm) => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(*perm)
                    .open(p)
                    .map_err(io_err(p, "create"))?;
                copy_blob(blob, &mut f, p)?;
            }
            Action::Replace(p, blob, perm) => {
                let mut tmp = p.as_os_str().to_owned();
                tmp.push(".supervise-restore");
                let tmp = PathBuf::from(tmp);
                let _ = fs::remove_file(&tmp);
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(*perm)
                    .open(&tmp)
                    .map_err(io_err(&tmp, "create"))?;
                copy_blob(blob, &mut f, &tmp)?;
                fs::rename(&tmp, p).map_err(io_err(p, "rename"))?;
            }
            Action::Remove(p) => match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(p, "remove")(e)),
            },
        }
    }
    Ok(())
}

/// Puts the files recorded in `image_dir` back to their checkpoint state.
/// Returns the actions taken (empty if the image recorded no file state or
/// rollback is off).
pub fn rollback(image_dir: &Path, cfg: &FilesConfig) -> Result<Vec<Action>, FilesError> {
    if !cfg.rollback {
        return Ok(Vec::new());
    }
    let Some(state) = load(image_dir)? else {
        return Ok(Vec::new());
    };
    let actions = plan(&state, image_dir, cfg)?;
    apply(&actions)?;
    Ok(actions)
}

#[cfg(test)]
mod tests;
