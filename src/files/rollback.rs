//! Putting the job's files back to a checkpoint's state (see the module
//! docs of [`crate::files`], "Safety of a rollback").

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::stat::{FileStat, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};

use super::resolve::{self, Walk, WalkError};
use super::{
    excluded, fingerprints, io_err, load, FileRecord, FileState, FilesConfig, FilesError, Mode,
};
use crate::fsutil;

/// One step of a rollback, as reported (logs, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Already in its checkpoint state.
    Keep(PathBuf),
    /// Truncate to this size.
    Truncate(PathBuf, u64),
    /// Write the blob's content into the existing file (same inode).
    Rewrite(PathBuf, PathBuf),
    /// The content is as at the checkpoint but the modification time is
    /// not: only the recorded times are put back.
    Retime(PathBuf),
    /// Create the file from the blob (it was deleted).
    Recreate(PathBuf, PathBuf, u32),
    /// Replace the path by the blob's content (temp file + rename).
    Replace(PathBuf, PathBuf, u32),
    /// Remove the path.
    Remove(PathBuf),
}

/// A new file's recorded permission bits and, when recorded, owner.
#[derive(Debug)]
struct Attrs {
    perm: u32,
    owner: Option<(u32, u32)>,
    times: Times,
}

/// The recorded (access, modification) times, for `futimens`; None in
/// records written before supervise recorded them.
type Times = Option<(TimeSpec, TimeSpec)>;

fn times(r: &FileRecord) -> Times {
    let ts = |(s, ns): (i64, i64)| TimeSpec::new(s, ns);
    r.mtime
        .map(|m| (r.atime.map_or(TimeSpec::UTIME_OMIT, ts), ts(m)))
}

/// Puts the recorded times back on `f` (after its content was written).
fn set_times(f: &File, t: &Times, path: &Path) -> Result<(), FilesError> {
    if let Some((atime, mtime)) = t {
        nix::sys::stat::futimens(f.as_raw_fd(), atime, mtime)
            .map_err(|e| io_err(path, "set the times of")(e.into()))?;
    }
    Ok(())
}

/// What a step does, on descriptors opened and checked by [`plan`].
#[derive(Debug)]
enum Op {
    Keep,
    /// `ftruncate` the very file whose fingerprints were checked.
    Truncate(File, u64, Times),
    /// Write the blob into the very file that was checked.
    Rewrite(File, File, Times),
    /// Only `futimens` on the very file that was checked.
    Retime(File, Times),
    /// Create `name` in the checked directory (`O_CREAT|O_EXCL|O_NOFOLLOW`).
    Recreate(OwnedFd, OsString, File, Attrs),
    /// New temp file in the checked directory, renamed over `name` there.
    Replace(OwnedFd, OsString, File, Attrs),
    /// `unlinkat` in the checked directory.
    Remove(OwnedFd, OsString),
}

/// One planned step of a rollback: what it does ([`Step::action`]) and the
/// descriptors it does it on, opened and checked by [`plan`]; [`apply`]
/// carries it out without resolving any path again.
#[derive(Debug)]
pub struct Step {
    action: Action,
    op: Op,
    /// The file's identity once the step is done (None: no file remains);
    /// a recreated or replaced file's is read from the new file.
    ident: Option<(u64, u64)>,
    /// The job's descriptors and mappings that held it (see
    /// [`FileRecord::holders`]).
    holders: Vec<(i32, String)>,
}

/// A file the restored job must hold again, by identity: what
/// [`verify_restored`] checks after CRIU reopened the job's files by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The path as recorded.
    pub path: PathBuf,
    /// Device of the file left by the rollback.
    pub dev: u64,
    /// Inode of the file left by the rollback.
    pub ino: u64,
    /// (PID in the job's namespace, `fd/N` or `map_files/RANGE`).
    pub holders: Vec<(i32, String)>,
}

impl Step {
    /// What this step does.
    pub fn action(&self) -> &Action {
        &self.action
    }
}

fn conflict(path: &Path, reason: impl Into<String>) -> FilesError {
    FilesError::Conflict {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The refusal for a path that cannot be walked as recorded.
fn walk_conflict(path: &Path, e: WalkError) -> FilesError {
    match e {
        WalkError::BadPath(why) => conflict(path, why),
        WalkError::Symlink(at) => conflict(
            path,
            format!(
                "{} is a symlink now; supervise does not follow it",
                at.display()
            ),
        ),
        WalkError::NotADirectory(at) => conflict(
            path,
            format!(
                "{} is not a directory now; supervise does not guess",
                at.display()
            ),
        ),
        WalkError::Replaced(at) => conflict(
            path,
            format!(
                "directory {} is not the one recorded at the checkpoint (replaced or moved since)",
                at.display()
            ),
        ),
        WalkError::Io(at, e) => io_err(&at, "open directory")(e),
    }
}

fn is(st: &FileStat, k: SFlag) -> bool {
    resolve::kind(st) == k
}

fn same(st: &FileStat, r: &FileRecord) -> bool {
    is(st, SFlag::S_IFREG) && st.st_dev == r.dev && st.st_ino == r.ino
}

fn replaced(p: &Path, verb: &str) -> FilesError {
    conflict(
        p,
        format!(
            "it was replaced by another file since the checkpoint (different inode); \
             supervise does not {verb} it"
        ),
    )
}

fn deleted(p: &Path, r: &FileRecord) -> FilesError {
    conflict(
        p,
        format!(
            "it was deleted since the checkpoint, and with it the {} bytes \
             the job had written before the checkpoint",
            r.size
        ),
    )
}

/// Refusal for what is now at a path where a regular file is expected.
fn not_regular(p: &Path, st: &FileStat) -> FilesError {
    if is(st, SFlag::S_IFLNK) {
        conflict(
            p,
            format!(
                "{} is a symlink now; supervise does not follow it",
                p.display()
            ),
        )
    } else {
        conflict(
            p,
            "it is not a regular file now (a directory, FIFO, socket or device); \
             supervise does not touch it",
        )
    }
}

/// Opens the recorded file for reading and writing, never through a
/// symlink, and checks on the descriptor that it is the recorded inode.
fn open_same(
    dir: &OwnedFd,
    name: &std::ffi::OsStr,
    r: &FileRecord,
    verb: &str,
) -> Result<File, FilesError> {
    let p = &r.path;
    // O_NOATIME: comparing the content must not change the access time of
    // a file that is then kept as it is.
    let opened = match resolve::open_file_with(dir, name, true, nix::fcntl::OFlag::O_NOATIME) {
        Err(Errno::EPERM) => resolve::open_file(dir, name, true),
        r => r,
    };
    match opened {
        Ok((f, st)) if same(&st, r) => Ok(f),
        Ok((_, st)) if !is(&st, SFlag::S_IFREG) => Err(not_regular(p, &st)),
        Ok(_) => Err(replaced(p, verb)),
        Err(Errno::ELOOP) => Err(conflict(
            p,
            format!(
                "{} is a symlink now; supervise does not follow it",
                p.display()
            ),
        )),
        Err(Errno::ENOENT) => Err(conflict(p, "it was moved while supervise checked it")),
        Err(e) => Err(io_err(p, "open")(e.into())),
    }
}

fn open_blob(image_dir: &Path, r: &FileRecord) -> Result<(PathBuf, File), FilesError> {
    let blob = image_dir.join(r.blob.as_deref().unwrap_or_default());
    let f = fsutil::open_regular(&blob).map_err(io_err(&blob, "open"))?;
    Ok((blob, f))
}

fn attrs(r: &FileRecord) -> Attrs {
    Attrs {
        perm: r.perm,
        owner: r.uid.zip(r.gid),
        times: times(r),
    }
}

/// Plans one record: walks to it without following anything, checks every
/// directory against the recorded identities, opens what will be changed.
fn plan_one(r: &FileRecord, image_dir: &Path) -> Result<Step, FilesError> {
    let p = &r.path;
    let (_, name) = resolve::split(p).map_err(|e| walk_conflict(p, e))?;
    let name = name.to_os_string();
    let step = |action, op| {
        Ok(Step {
            action,
            op,
            ident: None,
            holders: Vec::new(),
        })
    };
    let dir = match resolve::open_parent(p, &r.dirs) {
        Ok(Walk::Parent(fd, _)) => fd,
        Ok(Walk::Missing(at, _)) => {
            return match r.mode {
                Mode::Absent => step(Action::Keep(p.clone()), Op::Keep),
                Mode::Extend => Err(deleted(p, r)),
                Mode::Snapshot => Err(conflict(
                    p,
                    format!(
                        "directory {} no longer exists; supervise does not recreate directories",
                        at.display()
                    ),
                )),
            }
        }
        Err(e) => return Err(walk_conflict(p, e)),
    };
    let now = resolve::lstat_at(&dir, &name).map_err(|e| io_err(p, "stat")(e.into()))?;
    match (r.mode, now) {
        (Mode::Absent, None) => step(Action::Keep(p.clone()), Op::Keep),
        (Mode::Absent, Some(st)) if is(&st, SFlag::S_IFDIR) => Err(conflict(
            p,
            "it is a directory now (it was absent at the checkpoint); supervise does not \
             remove directories",
        )),
        // unlinkat removes the entry itself, whatever it is (a symlink is
        // removed, never followed).
        (Mode::Absent, Some(_)) => step(Action::Remove(p.clone()), Op::Remove(dir, name)),
        (Mode::Snapshot, Some(st)) if !is(&st, SFlag::S_IFREG) => Err(not_regular(p, &st)),
        (Mode::Snapshot, _) if r.listed => {
            let (blob, bf) = open_blob(image_dir, r)?;
            step(
                Action::Replace(p.clone(), blob, r.perm),
                Op::Replace(dir, name, bf, attrs(r)),
            )
        }
        (Mode::Snapshot, None) => {
            let (blob, bf) = open_blob(image_dir, r)?;
            step(
                Action::Recreate(p.clone(), blob, r.perm),
                Op::Recreate(dir, name, bf, attrs(r)),
            )
        }
        (Mode::Snapshot, Some(st)) if !same(&st, r) => Err(replaced(p, "overwrite")),
        (Mode::Snapshot, Some(st)) => {
            let f = open_same(&dir, &name, r, "overwrite")?;
            let (blob, bf) = open_blob(image_dir, r)?;
            // A file the job did not change (say, mapped shared and
            // writable, never written) is not touched at all: rewriting it
            // would move its modification time.
            if same_content(&f, &bf, p)? {
                let t = times(r);
                let now = (st.st_mtime, st.st_mtime_nsec);
                return match t {
                    Some(_) if r.mtime != Some(now) => {
                        step(Action::Retime(p.clone()), Op::Retime(f, t))
                    }
                    _ => step(Action::Keep(p.clone()), Op::Keep),
                };
            }
            step(
                Action::Rewrite(p.clone(), blob),
                Op::Rewrite(f, bf, times(r)),
            )
        }
        (Mode::Extend, None) => Err(deleted(p, r)),
        (Mode::Extend, Some(st)) if !is(&st, SFlag::S_IFREG) => Err(not_regular(p, &st)),
        (Mode::Extend, Some(st)) if !same(&st, r) => Err(replaced(p, "truncate")),
        (Mode::Extend, Some(_)) => {
            // From here on only this descriptor: the size, the
            // fingerprints and the truncation all concern the same inode.
            let f = open_same(&dir, &name, r, "truncate")?;
            let len = f.metadata().map_err(io_err(p, "stat"))?.len();
            if len < r.size {
                return Err(conflict(
                    p,
                    format!(
                        "it is shorter ({len} bytes) than at the checkpoint ({} bytes): it was \
                         truncated since; list it in [files] snapshot if the job does that",
                        r.size
                    ),
                ));
            }
            // A file the job held under a lease through write-only
            // descriptors only was recorded without fingerprints.
            let unprinted = r.head.is_none() && r.tail.is_none();
            let (h, t) = fingerprints(&f, r.size, p)?;
            if !unprinted && (Some(&h) != r.head.as_ref() || Some(&t) != r.tail.as_ref()) {
                return Err(conflict(
                    p,
                    "bytes written before the checkpoint have changed since (rewritten in \
                     place?); list it in [files] snapshot so its content is kept",
                ));
            }
            if len == r.size {
                step(Action::Keep(p.clone()), Op::Keep)
            } else {
                step(
                    Action::Truncate(p.clone(), r.size),
                    Op::Truncate(f, r.size, times(r)),
                )
            }
        }
    }
}

/// Decides, without changing anything, how to put every recorded file
/// back, and opens (and checks) everything that will be changed; fails on
/// the first file that cannot be put back safely.
pub fn plan(
    state: &FileState,
    image_dir: &Path,
    cfg: &FilesConfig,
) -> Result<Vec<Step>, FilesError> {
    state
        .files
        .iter()
        .filter(|r| !excluded(&r.path, cfg, &[]))
        .map(|r| {
            let mut s = plan_one(r, image_dir)?;
            if r.mode != Mode::Absent {
                s.ident = Some((r.dev, r.ino));
                s.holders = r.holders.clone();
            }
            Ok(s)
        })
        .collect()
}

/// Copies the blob into `dst` from offset 0 and cuts `dst` to its length.
fn copy_blob(blob: &mut File, dst: &mut File, dst_path: &Path) -> Result<u64, FilesError> {
    blob.seek(SeekFrom::Start(0))
        .map_err(io_err(dst_path, "read the copy"))?;
    dst.seek(SeekFrom::Start(0))
        .map_err(io_err(dst_path, "seek"))?;
    let n = io::copy(blob, dst).map_err(io_err(dst_path, "write"))?;
    dst.set_len(n).map_err(io_err(dst_path, "truncate"))?;
    Ok(n)
}

/// True if `f` holds exactly the blob's bytes: same size, then the same
/// content, compared chunk by chunk with positional reads.
fn same_content(f: &File, blob: &File, path: &Path) -> Result<bool, FilesError> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata().map_err(io_err(path, "stat"))?.len();
    if len
        != blob
            .metadata()
            .map_err(io_err(path, "stat the copy of"))?
            .len()
    {
        return Ok(false);
    }
    const CHUNK: usize = 1 << 16;
    let (mut a, mut b) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut off = 0u64;
    while off < len {
        let n = CHUNK.min((len - off) as usize);
        f.read_exact_at(&mut a[..n], off)
            .map_err(io_err(path, "read"))?;
        blob.read_exact_at(&mut b[..n], off)
            .map_err(io_err(path, "read the copy of"))?;
        if a[..n] != b[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// Gives a new file its recorded owner, then its recorded mode (in this
/// order: a chown clears set-id bits), and its recorded times, and syncs
/// it.
fn finish(f: &File, a: &Attrs, path: &Path) -> Result<(), FilesError> {
    if let Some((uid, gid)) = a.owner {
        nix::unistd::fchown(
            f.as_raw_fd(),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
        )
        .map_err(|e| io_err(path, "chown")(e.into()))?;
    }
    nix::sys::stat::fchmod(
        f.as_raw_fd(),
        nix::sys::stat::Mode::from_bits_truncate(a.perm & 0o7777),
    )
    .map_err(|e| io_err(path, "chmod")(e.into()))?;
    set_times(f, &a.times, path)?;
    f.sync_all().map_err(io_err(path, "fsync"))
}

/// The (device, inode) of an open file.
fn ident_of(f: &File, p: &Path) -> Result<Option<(u64, u64)>, FilesError> {
    use std::os::unix::fs::MetadataExt;
    let md = f.metadata().map_err(io_err(p, "stat"))?;
    Ok(Some((md.dev(), md.ino())))
}

/// Carries out one step; for a new file, returns its identity.
fn apply_one(action: &Action, op: Op) -> Result<Option<(u64, u64)>, FilesError> {
    let p = match action {
        Action::Keep(p)
        | Action::Truncate(p, _)
        | Action::Rewrite(p, _)
        | Action::Retime(p)
        | Action::Recreate(p, ..)
        | Action::Replace(p, ..)
        | Action::Remove(p) => p,
    };
    match op {
        Op::Keep => Ok(None),
        Op::Truncate(f, size, t) => {
            f.set_len(size).map_err(io_err(p, "truncate"))?;
            set_times(&f, &t, p)?;
            f.sync_all().map_err(io_err(p, "fsync"))?;
            Ok(None)
        }
        Op::Rewrite(mut f, mut blob, t) => {
            copy_blob(&mut blob, &mut f, p)?;
            set_times(&f, &t, p)?;
            f.sync_all().map_err(io_err(p, "fsync"))?;
            Ok(None)
        }
        Op::Retime(f, t) => {
            set_times(&f, &t, p)?;
            f.sync_all().map_err(io_err(p, "fsync"))?;
            Ok(None)
        }
        Op::Recreate(dir, name, mut blob, a) => {
            let fd = resolve::open_at(
                &dir,
                &name,
                nix::fcntl::OFlag::O_WRONLY
                    | nix::fcntl::OFlag::O_CREAT
                    | nix::fcntl::OFlag::O_EXCL,
                0o600,
            )
            .map_err(|e| io_err(p, "create")(e.into()))?;
            let mut f = File::from(fd);
            copy_blob(&mut blob, &mut f, p)?;
            finish(&f, &a, p)?;
            ident_of(&f, p)
        }
        Op::Replace(dir, name, mut blob, a) => {
            let (mut f, tmp) = fsutil::create_temp_file_at(dir.as_fd(), "supervise-restore", 0o600)
                .map_err(io_err(p, "create a temporary file next to"))?;
            let res = copy_blob(&mut blob, &mut f, p)
                .and_then(|_| finish(&f, &a, p))
                .and_then(|()| {
                    nix::fcntl::renameat(
                        Some(dir.as_raw_fd()),
                        tmp.as_str(),
                        Some(dir.as_raw_fd()),
                        name.as_os_str(),
                    )
                    .map_err(|e| io_err(p, "rename")(e.into()))
                });
            if res.is_err() {
                let _ = nix::unistd::unlinkat(
                    Some(dir.as_raw_fd()),
                    tmp.as_str(),
                    UnlinkatFlags::NoRemoveDir,
                );
            }
            res?;
            ident_of(&f, p)
        }
        Op::Remove(dir, name) => {
            match nix::unistd::unlinkat(
                Some(dir.as_raw_fd()),
                name.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            ) {
                Ok(()) | Err(Errno::ENOENT) => Ok(None),
                Err(e) => Err(io_err(p, "remove")(e.into())),
            }
        }
    }
}

/// Carries out a plan, on the descriptors it holds. Returns what was done.
pub fn apply(steps: Vec<Step>) -> Result<Vec<Action>, FilesError> {
    apply_checked(steps).map(|(done, _)| done)
}

/// [`apply`], also returning the identity of every file left in place and
/// the job's descriptors that must hold it after the restore.
pub fn apply_checked(steps: Vec<Step>) -> Result<(Vec<Action>, Vec<Expected>), FilesError> {
    let mut done = Vec::with_capacity(steps.len());
    let mut expect = Vec::new();
    for Step {
        action,
        op,
        ident,
        holders,
    } in steps
    {
        let new = apply_one(&action, op)?;
        if let (Some((dev, ino)), false) = (new.or(ident), holders.is_empty()) {
            if let Some(path) = action_path(&action) {
                expect.push(Expected {
                    path: path.clone(),
                    dev,
                    ino,
                    holders,
                });
            }
        }
        done.push(action);
    }
    Ok((done, expect))
}

fn action_path(a: &Action) -> Option<&PathBuf> {
    match a {
        Action::Remove(_) => None,
        Action::Keep(p)
        | Action::Truncate(p, _)
        | Action::Rewrite(p, _)
        | Action::Retime(p)
        | Action::Recreate(p, ..)
        | Action::Replace(p, ..) => Some(p),
    }
}

/// After CRIU restored the job (its tasks not yet resumed: CRIU's
/// `post-restore` notification): every descriptor and shared mapping that
/// held a rolled-back file at the checkpoint must hold that very file now.
/// CRIU reopens the job's files by path, following symlinks, and checks
/// only their size and mode; a path swapped between the rollback and that
/// open would give the restored job another file. `host_pid` maps a PID in
/// the job's namespace to supervise's. A mismatch refuses the restore,
/// naming the path and what the job would have held instead.
pub fn verify_restored(
    expected: &[Expected],
    host_pid: &dyn Fn(i32) -> Option<i32>,
) -> Result<(), FilesError> {
    use std::os::unix::fs::MetadataExt;
    for e in expected {
        for (ns_pid, rel) in &e.holders {
            let Some(pid) = host_pid(*ns_pid) else {
                return Err(conflict(
                    &e.path,
                    format!("process {ns_pid} that held it is missing after the restore"),
                ));
            };
            let handle = PathBuf::from(format!("/proc/{pid}/{rel}"));
            let md = std::fs::metadata(&handle).map_err(io_err(&e.path, "check the restored"))?;
            if (md.dev(), md.ino()) != (e.dev, e.ino) {
                let held = std::fs::read_link(&handle)
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "another file".into());
                return Err(conflict(
                    &e.path,
                    format!(
                        "CRIU reopened it by path as {held} (ns pid {ns_pid}, {rel}): the path \
                         was swapped after the rollback; the restore is aborted before the job runs"
                    ),
                ));
            }
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
    let steps = plan(&state, image_dir, cfg)?;
    apply(steps)
}

/// [`rollback`], also returning what [`verify_restored`] must find after
/// CRIU's restore. With a `tracker`, the names the job touched that the
/// image does not record are dealt with as [`super::Journal::rollback_plan`]
/// says: those it created after the image are removed (checked and done
/// like a listed file that was absent), the others are returned, with the
/// reason, to be logged.
pub fn rollback_checked(
    image_dir: &Path,
    cfg: &FilesConfig,
    tracker: Option<&super::Tracker>,
) -> Result<Rolled, FilesError> {
    if !cfg.rollback {
        return Ok(Rolled::default());
    }
    let Some(mut state) = load(image_dir)? else {
        return Ok(Rolled::default());
    };
    let mut left = Vec::new();
    if let Some(t) = tracker {
        // Recorded, or seen and not recordable (a FIFO, a socket): the
        // image's either way, never removed.
        let recorded: std::collections::BTreeSet<PathBuf> = state
            .files
            .iter()
            .map(|r| r.path.clone())
            .chain(state.skipped.iter().map(|(p, _)| p.clone()))
            .collect();
        let plan = t.plan(&recorded);
        left = plan.leave;
        for p in plan.remove {
            if resolve::split(&p).is_err() {
                continue;
            }
            state.files.push(FileRecord {
                path: p,
                mode: Mode::Absent,
                why: "created by the job after the checkpoint".into(),
                size: 0,
                dev: 0,
                ino: 0,
                perm: 0,
                listed: true,
                head: None,
                tail: None,
                blob: None,
                dirs: Vec::new(),
                uid: None,
                gid: None,
                holders: Vec::new(),
                mtime: None,
                atime: None,
            });
        }
    }
    let steps = plan(&state, image_dir, cfg)?;
    let (actions, expected) = apply_checked(steps)?;
    Ok(Rolled {
        actions,
        expected,
        left,
        restored_names: state
            .files
            .iter()
            .filter(|r| r.why.starts_with(super::TOUCHED_WHY))
            .map(|r| r.path.clone())
            .collect(),
    })
}

/// What [`rollback_checked`] did.
#[derive(Debug, Default)]
pub struct Rolled {
    /// The actions, file by file.
    pub actions: Vec<Action>,
    /// What [`verify_restored`] must find.
    pub expected: Vec<Expected>,
    /// Names the job changed after the checkpoint that are left as they
    /// are, and why.
    pub left: Vec<(PathBuf, String)>,
    /// The names the image recorded because the job had changed them (the
    /// journal of the restored job starts with them).
    pub restored_names: Vec<PathBuf>,
}
