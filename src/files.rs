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
//!   kept: with a shadow directory (`FilesConfig::shadow_dir`, what the
//!   supervisor uses) the file is compared, while the job is frozen, with
//!   its shadow copy from the last checkpoint and only the pieces that
//!   differ are rewritten; the copy into the checkpoint is made from the
//!   shadow after the freeze ([`finish_copies`]). Without one it is copied
//!   while frozen (by `copy_file_range`, which reflinks where the file
//!   system can). A rollback writes it back.
//! * **absent** — a path listed in `[files] snapshot` that did not exist at
//!   the checkpoint; a rollback removes it.
//!
//! # Leases and times
//! The job is frozen while its files are recorded, so nothing may start a
//! lease break it would have to answer: a file the job holds open is never
//! opened by supervise. Its identity is checked with `fstatat` (no open),
//! and its content is read through a duplicate of the job's own descriptor
//! (`pidfd_getfd(2)`) with positional reads only (a duplicate shares the
//! job's file offset, which must not move). Only a file the job holds no
//! readable descriptor of, and no lease on, is opened for reading (a
//! write-only *extend* file, a mapping without a descriptor, a listed
//! file). A leased file held only write-only is recorded by size, without
//! fingerprints (*extend*), or skipped (*snapshot*), with the reason.
//!
//! Each record keeps the file's modification and access times. A rollback
//! compares a *snapshot* file with its copy first (size, then content) and
//! leaves an unchanged one alone (times, ctime included, untouched); every
//! file it writes, truncates, recreates or replaces gets the recorded times
//! back (`futimens`), as does an unchanged file whose modification time
//! moved (rewritten with the same bytes).
//!
//! # Files the job does not hold open
//! With `[files] watch` (the default) a [`Tracker`] learns, from fanotify,
//! every name the job created, wrote, renamed or deleted in its watched
//! directories (see `tracker.rs`); [`capture_with`] records each of them by
//! name like a file listed in `[files] snapshot` (*snapshot* if it exists,
//! *absent* if not), and [`rollback_checked`] also removes the names the
//! job created after the image ([`Journal::rollback_plan`]).
//!
//! Files opened read-only, anything under
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
//! files listed in `[files] snapshot` are put back by name (a temporary
//! file renamed over it), as jobs often replace them atomically themselves.
//!
//! supervise runs as root, and the job's files often live in a directory
//! another (untrusted) user owns, who can rename, replace and symlink
//! anything in it at any moment. So nothing is ever followed, and nothing
//! is looked up by path twice:
//! * **Directory identities.** [`capture`] records, for every file, the
//!   (device, inode) of every directory from `/` down to its parent, and
//!   the file's owner. Paths are walked one component at a time from `/`
//!   with `openat(dir, name, O_PATH|O_DIRECTORY|O_NOFOLLOW)`; empty, `.`
//!   and `..` components are refused. At a rollback each directory's
//!   descriptor is `fstat`ed and compared with the record: a directory
//!   renamed away and replaced by another (or by a symlink) refuses the
//!   image, naming the directory ("directory /x/y is not the one recorded at
//!   the checkpoint (replaced or moved since)", "/x/y is a symlink now;
//!   supervise does not follow it"). So does a symlink, a directory, a FIFO
//!   or a device in place of a file.
//! * **Descriptors.** [`plan`] opens each file itself with
//!   `openat(parent, name, O_NOFOLLOW|O_NONBLOCK|O_NOCTTY)` (after an
//!   `fstatat` without following, so nothing but a regular file is opened),
//!   checks type and (device, inode) on the descriptor, and reads the
//!   *extend* fingerprints from it; the [`Step`]s it returns hold these
//!   descriptors, and [`apply`] acts only on them: `ftruncate`, rewrite and
//!   `fsync` on the file's descriptor; `unlinkat`, create (`O_CREAT|O_EXCL|
//!   O_NOFOLLOW`) and replace (a temporary file with a random name created
//!   the same way, written, given the recorded owner and mode, synced, then
//!   `renameat`) relative to the checked parent's descriptor. A rename or
//!   `RENAME_EXCHANGE` between check and use therefore changes nothing: the
//!   checked inode is the one changed, wherever its name went.
//! * **Capture** walks the same way: a file the job holds open is recorded
//!   only if the same inode is reachable by its path without a symlink;
//!   a `[files] snapshot` path through a symlink (in any component) is not
//!   read but listed in `skipped` with the reason (list the real path).
//! * **Older records** (written before directory identities were recorded:
//!   no `dirs`, `uid`, `gid`; the format version is unchanged) are rolled
//!   back without the per-directory comparison, but still without
//!   following any symlink and with every action on checked descriptors.
//! * An *absent* listed file whose directory did not exist at the checkpoint
//!   records the directories that did; those below are walked (never
//!   followed) but cannot be compared.
//!
//! The consequence for jobs: a job that replaces or renames the directory
//! its files live in after a checkpoint makes that image unusable.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod capture;
mod journal;
mod options;
mod resolve;
mod rollback;
mod tracker;
pub mod watch;

pub use capture::{capture, capture_with, finish_copies};
pub use journal::{Journal, Plan};
pub use options::FilesConfig;
pub use rollback::{
    apply, apply_checked, plan, rollback, rollback_checked, verify_restored, Action, Expected,
    Rolled, Step,
};
pub use tracker::{Tracker, WatchFds, MAX_DIRS};

/// Name of the file-state record inside a checkpoint.
pub const STATE_FILE: &str = "supervise-files.json";
/// Prefix of the content copies inside a checkpoint.
pub const BLOB_PREFIX: &str = "supervise-file-";
/// Format version of [`STATE_FILE`].
pub const STATE_VERSION: u32 = 1;
/// The reason recorded for a name kept because the job changed it.
pub const TOUCHED_WHY: &str = "changed by the job (created, written, renamed or deleted)";
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

impl FilesError {
    /// True when a resource ran short (descriptors, memory, space): the
    /// same rollback may work later.
    pub fn is_resource(&self) -> bool {
        matches!(self, FilesError::Io { source, .. } if crate::fdlimit::is_resource_error(source))
    }
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

/// The identity of a directory: (device, inode) of an open descriptor.
/// Stored as `[dev, ino]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(u64, u64)", into = "(u64, u64)")]
pub struct DirId {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
}

impl From<(u64, u64)> for DirId {
    fn from((dev, ino): (u64, u64)) -> DirId {
        DirId { dev, ino }
    }
}

impl From<DirId> for (u64, u64) {
    fn from(d: DirId) -> (u64, u64) {
        (d.dev, d.ino)
    }
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
    /// Put back by path, whatever its inode: listed in `[files] snapshot`,
    /// or a name the job changed (its `why` starts with [`TOUCHED_WHY`]).
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
    /// Identity of every directory from `/` down to the file's parent at
    /// the checkpoint (first `/`). For an *absent* file whose directories
    /// did not all exist, only those that did. Empty in records written
    /// before supervise recorded it: such records are rolled back without
    /// the per-directory check (still never through a symlink).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<DirId>,
    /// Owner at the checkpoint (a recreated or replaced file gets it back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Group at the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Which of the job's descriptors and shared mappings held this file at
    /// the checkpoint: (PID inside the job's namespace, `fd/N` or
    /// `map_files/RANGE`). After CRIU restored them (reopening by path),
    /// each must be the file the rollback checked ([`verify_restored`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<(i32, String)>,
    /// Modification time at the checkpoint (seconds, nanoseconds); a
    /// rolled-back file gets it back. None in records written before
    /// supervise recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<(i64, i64)>,
    /// Access time at the checkpoint, put back with the modification time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atime: Option<(i64, i64)>,
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
    /// Of `bytes_copied`, the bytes that differed from the shadow copy and
    /// were rewritten while the job was frozen (with a shadow directory).
    pub bytes_changed: u64,
    /// Copies still to make into the checkpoint once the job runs again:
    /// (shadow file, blob name). See [`finish_copies`].
    pub deferred: Vec<(PathBuf, String)>,
    /// The directories of the files recorded (watched from then on).
    pub dirs: Vec<PathBuf>,
}

/// One way the job holds a file open for writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// Path as the kernel reports it.
    pub path: PathBuf,
    /// `/proc/PID/fd/N` or `/proc/PID/map_files/...` (only stat'ed: an open
    /// would break a lease the job holds).
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
/// The path outside the job's mount namespace of `p`, a path the job
/// sees: under the inside path of one of `views`, the same place under its
/// outside path; else `p` itself.
pub fn outside_path(p: &Path, views: &[(PathBuf, PathBuf)]) -> PathBuf {
    for (inside, outside) in views {
        if let Ok(rest) = p.strip_prefix(inside) {
            return if rest.as_os_str().is_empty() {
                outside.clone()
            } else {
                outside.join(rest)
            };
        }
    }
    p.to_path_buf()
}

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

/// SHA-256 of `len` bytes of `f` from `start` (positional reads: the
/// descriptor's offset is not used).
fn sha256_range(f: &File, start: u64, len: u64, path: &Path) -> Result<String, FilesError> {
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, start)
        .map_err(io_err(path, "read"))?;
    Ok(hex::encode(Sha256::digest(&buf)))
}

/// (head, tail) fingerprints of the first `size` bytes of `f`.
fn fingerprints(f: &File, size: u64, path: &Path) -> Result<(String, String), FilesError> {
    let n = size.min(FINGERPRINT_BYTES);
    let head = sha256_range(f, 0, n, path)?;
    let tail = sha256_range(f, size - n, n, path)?;
    Ok((head, tail))
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
        // Directory identities: at most one per directory from `/` to the
        // parent; all of them (or none, in older records) unless the file
        // was absent.
        let dirs_ok = r.dirs.is_empty()
            || resolve::split(&r.path).is_ok_and(|(parents, _)| {
                let full = parents.len() + 1;
                r.dirs.len() == full || (r.mode == Mode::Absent && r.dirs.len() < full)
            });
        if !r.path.is_absolute() || !blob_ok || !dirs_ok {
            return Err(FilesError::Malformed {
                path,
                reason: format!("bad record for {}", r.path.display()),
            });
        }
    }
    Ok(Some(state))
}

#[cfg(test)]
mod tests;
